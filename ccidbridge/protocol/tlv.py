"""BER-TLV (ISO/IEC 7816-4 §5.2), just what the bridge reads: one object at a time."""

from __future__ import annotations


class TlvError(ValueError):
    """Bytes that do not parse as a BER-TLV object."""


def read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the BER-TLV at ``pos``."""
    if pos >= len(data):
        raise TlvError("TLV ends before its tag")
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:
        while True:
            if pos >= len(data):
                raise TlvError("TLV ends inside its tag")
            tag = tag << 8 | data[pos]
            pos += 1
            if not data[pos - 1] & 0x80:
                break
            if tag > 0xFFFFFF:
                raise TlvError("tag longer than 3 bytes")
    if pos >= len(data):
        raise TlvError("TLV ends before its length")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first in (0x81, 0x82, 0x83):
        n = first & 0x7F
        if pos + n > len(data):
            raise TlvError("TLV ends inside its length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    else:
        raise TlvError(f"length byte {first:02X} is not valid BER")
    if pos + length > len(data):
        raise TlvError(f"TLV {tag:X} says {length} bytes, {len(data) - pos} follow")
    return tag, pos, pos + length
