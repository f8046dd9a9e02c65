"""Serving card responses longer than QEMU's 374-byte cap.

QEMU 7.2 drops a longer VSC_APDU response without a word and the guest hangs
(qemu.MAX_RESPONSE_TO_QEMU).  A card with such an answer is only possible
after an extended-length command (Le > 256).  The bridge answers it the way a
T=0 card does when the answer does not fit (ISO/IEC 7816-4 §5.1.3 and
7816-3 §10.3.5): the first part of the data with SW ``61 XX`` ("XX more bytes
available; 00 means 256 or more"), the rest on GET RESPONSE (``00 C0 00 00
Le``) from the guest, served from the bridge's buffer without touching the
card; the last part carries the card's own status word.  The guest already
speaks this: its reader is T=0-only, and PC/SC middleware (OpenSC, the
Windows minidriver stack) issues GET RESPONSE on 61xx by itself.
Any other command drops the buffer, as a card would.
"""

from __future__ import annotations

from ccidbridge.protocol.qemu import MAX_RESPONSE_TO_QEMU

#: Data bytes per chunk: the largest short-APDU answer, so that a guest
#: buffer sized for short APDUs still holds every part.
CHUNK = 256
MAX_DATA = MAX_RESPONSE_TO_QEMU - 2
assert CHUNK <= MAX_DATA


def _sw_more(remaining: int) -> bytes:
    return bytes((0x61, remaining if remaining < 256 else 0x00))


def is_get_response(apdu: bytes) -> bool:
    """GET RESPONSE: interindustry CLA (b8 = 0), INS C0, P1 = P2 = 00."""
    return len(apdu) >= 4 and apdu[1] == 0xC0 and not apdu[0] & 0x80 and apdu[2:4] == b"\0\0"


def requested_length(apdu: bytes) -> int:
    """Ne of a GET RESPONSE: short Le (00 = 256), extended Le (0000 = 65536),
    or 256 when the command carries no Le at all (a bare TPDU header)."""
    if len(apdu) == 5:
        return apdu[4] or 256
    if len(apdu) == 7 and apdu[4] == 0:
        return int.from_bytes(apdu[5:7], "big") or 65536
    return 256


class ResponseChain:
    """The undelivered rest of one long card response."""

    __slots__ = ("_data", "_sw")

    def __init__(self, data: bytes, sw: bytes) -> None:
        self._data = data
        self._sw = sw

    @property
    def remaining(self) -> int:
        return len(self._data)

    def next_part(self, wanted: int) -> bytes:
        """The next response: up to ``wanted`` bytes, then 61xx or the card's SW."""
        n = min(wanted, CHUNK, len(self._data))
        part, self._data = self._data[:n], self._data[n:]
        return part + (_sw_more(len(self._data)) if self._data else self._sw)


def defer(response: bytes) -> tuple[bytes, ResponseChain]:
    """``61 XX`` now and every data byte on GET RESPONSE, as a T=0 card answers
    a case-4 command (presentation rule P3).  ``response`` has data and SW."""
    data, sw = response[:-2], response[-2:]
    return _sw_more(len(data)), ResponseChain(data, sw)


def split(response: bytes) -> tuple[bytes, ResponseChain | None]:
    """What to send for ``response`` now, and the chain to serve the rest.

    Responses within the cap pass unchanged (``chain`` is ``None``).
    """
    if len(response) <= MAX_RESPONSE_TO_QEMU:
        return response, None
    data, sw = response[:-2], response[-2:]
    chain = ResponseChain(data, sw)
    return chain.next_part(CHUNK), chain
