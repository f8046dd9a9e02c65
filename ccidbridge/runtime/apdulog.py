"""What the log may say about an APDU: the one rule, stated here.

PINs travel in the data field of VERIFY, CHANGE REFERENCE DATA and RESET
RETRY COUNTER, in both encodings ISO/IEC 7816-4 gives them (even INS: plain
data; odd INS: BER-TLV data), under any class byte (secure messaging and
command chaining change CLA, not INS); ENVELOPE (C2/C3) can wrap any of
them.  For those commands neither the command data nor the response data ever
reaches a log line or trace, at any level.  For every other command the data
is shown only when asked for (``-vv``).  Every log line about an APDU is made
by :func:`describe_command` / :func:`describe_response`, and every data field
of the trace (trace.py) by :func:`shown_command_data` / :func:`shown_response_data`,
which state the rule.
"""

from __future__ import annotations

#: INS codes whose data may hold a PIN, PUK or new reference data.
SECRET_INS = frozenset({0x20, 0x21, 0x24, 0x25, 0x2C, 0x2D, 0xC2, 0xC3})


def is_secret(apdu: bytes) -> bool:
    """True if ``apdu``'s data, and its answer's, must never be logged.

    A command too short to have an INS counts as secret: nothing about it is
    known, so none of it is shown.
    """
    return len(apdu) < 2 or apdu[1] in SECRET_INS


def shown_command_data(apdu: bytes, with_data: bool) -> bytes | None:
    """The command data a log line or trace may show: only when asked, never a PIN's."""
    if not with_data or len(apdu) <= 4 or is_secret(apdu):
        return None
    return apdu[4:]


def shown_response_data(response: bytes, with_data: bool, command: bytes) -> bytes | None:
    """The response data a log line or trace may show: only when asked, never after
    a PIN command."""
    if not with_data or len(response) <= 2 or is_secret(command):
        return None
    return response[:-2]


def describe_command(apdu: bytes, with_data: bool = False) -> str:
    """``CLA 00 INS A4 P1 04 P2 00, 12 bytes`` (+ data when allowed and safe)."""
    if len(apdu) < 4:
        return f"malformed command of {len(apdu)} bytes"
    text = (
        f"CLA {apdu[0]:02X} INS {apdu[1]:02X} P1 {apdu[2]:02X} P2 {apdu[3]:02X}, {len(apdu)} bytes"
    )
    data = shown_command_data(apdu, with_data)
    if data is not None:
        text += f" [{data.hex()}]"
    elif with_data and len(apdu) > 4:
        text += " [data redacted: PIN]"
    return text


def describe_response(response: bytes, with_data: bool = False, command: bytes = b"") -> str:
    """``SW 9000, 10 bytes`` (+ data when allowed, never for PIN commands)."""
    if len(response) < 2:
        return f"no status word ({len(response)} bytes)"
    text = f"SW {response[-2:].hex().upper()}, {len(response)} bytes"
    data = shown_response_data(response, with_data, command)
    if data is not None:
        text += f" [{data.hex()}]"
    return text
