"""What the log may say about an APDU.

PINs travel in the data field of VERIFY (INS 20), CHANGE REFERENCE DATA
(INS 24) and RESET RETRY COUNTER (INS 2C).  Their data never reaches a log
line or trace at any level; for every other command the data is shown only
at debug level (``-vv``).  Responses are described by length and status word.
"""

from __future__ import annotations

#: INS codes whose command data holds a PIN, PUK or new reference data.
SECRET_INS = frozenset({0x20, 0x24, 0x2C})


def is_secret(apdu: bytes) -> bool:
    return len(apdu) >= 2 and apdu[1] in SECRET_INS


def describe_command(apdu: bytes, with_data: bool = False) -> str:
    """``CLA 00 INS A4 P1 04 P2 00, 12 bytes`` (+ data when allowed and safe)."""
    if len(apdu) < 4:
        return f"malformed command of {len(apdu)} bytes"
    text = (
        f"CLA {apdu[0]:02X} INS {apdu[1]:02X} P1 {apdu[2]:02X} P2 {apdu[3]:02X}, {len(apdu)} bytes"
    )
    if with_data and len(apdu) > 4:
        text += " [data redacted: PIN]" if is_secret(apdu) else f" [{apdu[4:].hex()}]"
    return text


def describe_response(response: bytes, with_data: bool = False, command: bytes = b"") -> str:
    """``SW 9000, 10 bytes`` (+ data at debug level, never for PIN commands)."""
    if len(response) < 2:
        return f"no status word ({len(response)} bytes)"
    text = f"SW {response[-2:].hex().upper()}, {len(response)} bytes"
    if with_data and len(response) > 2 and not is_secret(command):
        text += f" [{response[:-2].hex()}]"
    return text
