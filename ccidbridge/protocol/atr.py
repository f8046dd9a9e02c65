"""Answer-To-Reset structure (ISO/IEC 7816-3 §8.2), just what the bridge needs.

An ATR is ``TS T0 {TAi TBi TCi TDi} historical-bytes [TCK]``: T0's high
nibble says which of TA1..TD1 follow, each TDi's high nibble does the same for
the next group and its low nibble names a protocol T.  TCK is present when
any TDi names a protocol other than T=0, and makes the XOR of T0..TCK zero.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


class AtrError(ValueError):
    """Bytes that do not parse as an ATR."""


@dataclass(frozen=True, slots=True)
class ParsedAtr:
    raw: bytes
    td_positions: tuple[int, ...]  # index of each TDi in ``raw``
    historical: bytes
    tck_position: int | None  # index of TCK, if the ATR has one

    @property
    def protocols(self) -> frozenset[int]:
        """Protocols offered: T=0 alone when there is no TD1 (7816-3 §8.2.3)."""
        if not self.td_positions:
            return frozenset({0})
        offered = {self.raw[i] & 0x0F for i in self.td_positions}
        offered.discard(15)  # T=15 is "global interface bytes", not a protocol
        return frozenset(offered)


def parse(atr: bytes) -> ParsedAtr:
    """Split ``atr`` into its parts; raises :class:`AtrError` when it is not one."""
    if len(atr) < 2:
        raise AtrError("an ATR has at least TS and T0")
    if atr[0] not in (0x3B, 0x3F):
        raise AtrError(f"TS is {atr[0]:02X}, not 3B or 3F")
    k = atr[1] & 0x0F
    y = atr[1] >> 4
    pos = 2
    tds: list[int] = []
    needs_tck = False
    while True:
        pos += bin(y & 0x7).count("1")  # TAi, TBi, TCi
        if not y & 0x8:
            break
        if pos >= len(atr):
            raise AtrError("ATR ends inside its interface bytes")
        tds.append(pos)
        if atr[pos] & 0x0F:
            needs_tck = True
        y = atr[pos] >> 4
        pos += 1
    if pos > len(atr):
        raise AtrError("ATR ends inside its interface bytes")
    if pos + k > len(atr):
        raise AtrError(f"ATR announces {k} historical bytes but has {len(atr) - pos}")
    historical = atr[pos : pos + k]
    pos += k
    tck = None
    if needs_tck:
        if pos >= len(atr):
            raise AtrError("ATR names a protocol other than T=0 but has no TCK")
        tck = pos
        pos += 1
    if pos != len(atr):
        raise AtrError(f"{len(atr) - pos} bytes after the end of the ATR")
    return ParsedAtr(bytes(atr), tuple(tds), historical, tck)


def tck(body: bytes | bytearray) -> int:
    """The check byte for ``body`` = T0..last byte before TCK."""
    x = 0
    for b in body:
        x ^= b
    return x


#: Card capabilities (compact-TLV 73), third byte: "extended Lc and Le fields".
EXT_LC_LE = 0x40


def _capabilities_index(historical: bytes) -> int | None:
    """Index in ``historical`` of the card capabilities' third byte, or None.

    Category indicator 00: compact TLV objects, then a 3-byte status
    indicator; 80: compact TLV objects only (ISO/IEC 7816-4 §8.1.1).  Other
    categories carry no compact TLV.  Raises AtrError on a broken TLV.
    """
    if not historical:
        return None
    if historical[0] == 0x00:
        end = len(historical) - 3
    elif historical[0] == 0x80:
        end = len(historical)
    else:
        return None
    pos = 1
    if end < pos:
        raise AtrError("historical bytes shorter than their status indicator")
    while pos < end:
        tag, length = historical[pos] >> 4, historical[pos] & 0x0F
        if pos + 1 + length > end:
            raise AtrError(f"compact-TLV object at byte {pos} runs past the end")
        if tag == 7 and length == 3:
            return pos + 3
        pos += 1 + length
    return None


def clear_ext_length(historical: bytes) -> bytes:
    """``historical`` with the extended Lc/Le bit cleared (presentation rule P1), or unchanged."""
    index = _capabilities_index(historical)
    if index is None or not historical[index] & EXT_LC_LE:
        return historical
    out = bytearray(historical)
    out[index] &= ~EXT_LC_LE & 0xFF
    return bytes(out)


def announce_t0(atr: bytes) -> bytes:
    """The same ATR as a T=0 short-APDU reader shows the card: TD1 names T=0.

    TD1's protocol nibble changes; later TDi (still naming T=1, so TCK stays
    meaningful) and every other byte are kept, and TCK is recomputed.  Seen
    in a real guest (protocol/VSCARD.md#Q10): pcscd then logs "Set PTS failed
    (606). Using T=0" and APDUs pass unchanged, since QEMU's reader
    exchanges whole APDUs either way.  If no TDi is left naming another
    protocol, TCK is dropped, since it would no longer be allowed.
    The historical bytes' "extended Lc/Le" capability is cleared too: T=0
    carries short APDUs only, and OpenSC, which reads the bit from the ATR,
    otherwise sends extended APDUs the guest's reader cannot frame
    (protocol/VSCARD.md#P1).  A broken compact TLV is left as it is.
    Returns ``atr`` unchanged when it already offers T=0.
    """
    parsed = parse(atr)
    if 0 in parsed.protocols:
        return bytes(atr)
    out = bytearray(atr)
    td1 = parsed.td_positions[0]
    out[td1] &= 0xF0
    end = parsed.tck_position if parsed.tck_position is not None else len(atr)
    with contextlib.suppress(AtrError):
        out[end - len(parsed.historical) : end] = clear_ext_length(parsed.historical)
    still_other = any(out[i] & 0x0F for i in parsed.td_positions)
    if parsed.tck_position is not None:
        if still_other:
            out[parsed.tck_position] = tck(out[1 : parsed.tck_position])
        else:
            del out[parsed.tck_position]
    return bytes(out)


def hexatr(atr: bytes) -> str:
    """``3B 95 13 ...``: how ATRs are written in logs and tools."""
    return atr.hex(" ").upper()
