"""How a card is presented to the guest: a T=0, short-APDU card, sans-IO.

Every released QEMU's ``usb-ccid`` offers only T=0 at TPDU level
(qemu.READER_PROTOCOLS), so whatever the host card is, the guest's stack
treats it as a T=0 card that moves at most 255 command and 256 response data
bytes per APDU.  A card that says otherwise about itself (extended Lc/Le, a
T=1 card that wants Le) makes the guest's middleware fail or lose data.  The
rules below change the least that makes the card's self-description
consistent with that reader; each is stated once, tagged where enforced,
logged once per card (:class:`~ccidbridge.protocol.events.PresentationApplied`)
and can be switched off per card (``<reader keep='NAME ...'>``, the names in
:data:`RULES`).  Answers that do not parse as the rule expects pass through
unchanged with one :class:`~ccidbridge.protocol.events.PresentationSkipped`.
Facts: protocol/VSCARD.md#P1 .. #P3.

P1 ``ext-length``: the "extended Lc and Le fields" bit (0x40 of the third
   byte of the card capabilities, compact-TLV tag 7 length 3, ISO/IEC 7816-4
   §8.1.1.2.7) is cleared in the answer to GET DATA 5F52 (the historical
   bytes).  scdaemon reads its extended-length capability only there and
   then refuses every extended APDU on a T=0 reader ("Not supported"), so
   ``gpg --card-status`` fails (protocol/VSCARD.md#P1).  OpenSC reads it
   there and in the ATR's historical bytes; the ATR's copy is cleared by
   R8's T=0 rewrite (atr.announce_t0), so an ATR R8 leaves alone keeps every
   byte of the card's.  The copy of 5F52 inside 006E is read by neither and
   left alone.
P2 ``max-length``: in the answer to GET DATA 006E, the extended length
   information DO 7F66 (two INTEGERs: the longest command and response) is
   capped at 255 and 256 bytes, what short APDUs carry.  OpenSC's openpgp
   driver sizes its APDUs and command chains from it; left at a YubiKey's
   3070 bytes, a 257-byte PSO:DECIPHER goes out as one chain link longer
   than a short APDU and fails (protocol/VSCARD.md#P2).
P3 ``le``: for a card the host talks to with T=1 (CardInserted.protocol, or
   a T=1-only ATR when that is not known), a guest command that
   comes without Le but is case 4 by its definition (data in, data out:
   SELECT returning FCI/FCP, GET DATA odd INS CB, GENERATE ASYMMETRIC KEY
   PAIR, INTERNAL/GENERAL AUTHENTICATE, PSO:CDS/DECIPHER/ENCIPHER) gets
   ``Le = 00``.  The guest's T=0 stack never sends Le on case 4
   (ISO/IEC 7816-3 §12.2.5), a T=0 card answers 61xx and the guest fetches
   the data with GET RESPONSE; a strict T=1 card answers such a command
   without Le with a bare 9000 and the data is lost (protocol/VSCARD.md#P3).
   The card's data then reaches the guest as a T=0 card would give it:
   ``61 xx`` first, the data on GET RESPONSE (chaining.py).  Only commands
   known to be case 4 are changed, so no command is ever sent twice and no
   case-3 command (VERIFY, PUT DATA, ...) ever gets an Le.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ccidbridge.protocol import events
from ccidbridge.protocol.atr import AtrError, clear_ext_length
from ccidbridge.protocol.atr import parse as parse_atr
from ccidbridge.protocol.tlv import TlvError, read_tlv

EXT_LENGTH = "ext-length"
MAX_LENGTH = "max-length"
LE = "le"
#: The rule names ``<reader keep='...'>`` accepts (``all``: every rule).
RULES = (EXT_LENGTH, MAX_LENGTH, LE)

_SHORT_MAX_COMMAND = 255  # P2
_SHORT_MAX_RESPONSE = 256
_OK = b"\x90\x00"


class Garbage(ValueError):
    """An answer that does not parse as the rule expects."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the guest gets for one card answer."""

    data: bytes
    #: Serve as a T=0 card would: 61xx now, the data on GET RESPONSE (P3).
    defer: bool = False


# -- the pieces each rule reads ---------------------------------------------


def _cap_max_length(data: bytes) -> bytes:
    """The 006E template with 7F66's two lengths capped (P2), or unchanged."""
    tag, start, end = read_tlv(data, 0)
    if tag != 0x6E or end != len(data):
        raise Garbage("the answer is not one 6E template")
    pos = start
    while pos < end:
        child, vstart, vend = read_tlv(data, pos)
        if child == 0x7F66:
            value = data[vstart:vend]
            if len(value) != 8 or value[0:2] != b"\x02\x02" or value[4:6] != b"\x02\x02":
                raise Garbage("7F66 is not two 2-byte INTEGERs")
            command = min(int.from_bytes(value[2:4], "big"), _SHORT_MAX_COMMAND)
            response = min(int.from_bytes(value[6:8], "big"), _SHORT_MAX_RESPONSE)
            capped = (value[0:2] + command.to_bytes(2, "big") + value[4:6]
                      + response.to_bytes(2, "big"))
            return data[:vstart] + capped + data[vend:]
        pos = vend
    return data


# -- which commands the rules look at ------------------------------------------


def _get_data_tag(apdu: bytes) -> int | None:
    """P1P2 of an interindustry GET DATA (INS CA) without command data."""
    if len(apdu) in (4, 5, 7) and apdu[1] == 0xCA and not apdu[0] & 0x80:
        return int.from_bytes(apdu[2:4], "big")
    return None


def _case4_without_le(apdu: bytes) -> bool:
    """A short command with data and no Le whose INS is case 4 by definition (P3)."""
    if len(apdu) < 6 or apdu[0] & 0x80 or apdu[0] == 0xFF:
        return False
    lc = apdu[4]
    if lc == 0 or len(apdu) != 5 + lc:
        return False  # extended, case 4 already, or not a well-formed case 3
    ins, p1, p2 = apdu[1], apdu[2], apdu[3]
    if ins == 0xA4:  # SELECT: P2 b4b3 = 11 means "no response data" (7816-4 §11.2.2)
        return p2 & 0x0C != 0x0C
    if ins == 0x2A:  # PSO: CDS 9E9A, DECIPHER 8086, ENCIPHER 8680 (7816-8)
        return (p1, p2) in ((0x9E, 0x9A), (0x80, 0x86), (0x86, 0x80))
    return ins in (0xCB, 0x47, 0x88, 0x86, 0x87)


# -- the rules, per card ---------------------------------------------------------


class Presentation:
    """The P rules for one session; :meth:`card` starts each new card."""

    def __init__(self, keep: frozenset[str] = frozenset(),
                 emit: Callable[[events.OutputEvent], None] | None = None) -> None:
        unknown = set(keep) - set(RULES) - {"all"}
        if unknown:
            raise ValueError(f"unknown presentation rules: {', '.join(sorted(unknown))}")
        self._active = frozenset() if "all" in keep else frozenset(RULES) - keep
        self._emit = emit or (lambda event: None)
        self._protocol: int | None = None
        self._told: set[str] = set()  # rules logged for this card
        self._context: dict[int, str] = {}  # seq -> the rule that looks at its answer

    def card(self, atr: bytes, protocol: int | None) -> None:
        """A (new) card: ``protocol`` is what the host talks to it with (0, 1, or
        None: unknown, and then T=1 if its ATR offers nothing else)."""
        if protocol is None:
            try:
                protocol = 1 if parse_atr(atr).protocols == {1} else None
            except AtrError:
                protocol = None
        self._protocol = protocol
        self._told.clear()
        self._context.clear()

    def _tell(self, rule: str, event: events.OutputEvent) -> None:
        if rule not in self._told:
            self._told.add(rule)
            self._emit(event)

    # -- APDU in from the guest -------------------------------------------------

    def command(self, seq: int, apdu: bytes) -> bytes:
        """What to send the card for guest request ``seq``."""
        tag = _get_data_tag(apdu)
        if tag == 0x5F52 and EXT_LENGTH in self._active:
            self._context[seq] = EXT_LENGTH
        elif tag == 0x006E and MAX_LENGTH in self._active:
            self._context[seq] = MAX_LENGTH
        elif LE in self._active and self._protocol == 1 and _case4_without_le(apdu):
            self._context[seq] = LE
            return apdu + b"\x00"
        return apdu

    def forget(self, seq: int | None = None) -> None:
        """Request ``seq`` (or every request) will get no card answer."""
        if seq is None:
            self._context.clear()
        else:
            self._context.pop(seq, None)

    # -- response from the card ---------------------------------------------------

    def response(self, seq: int, data: bytes) -> Answer:
        """What the guest gets for the card's answer ``data`` to request ``seq``."""
        rule = self._context.pop(seq, None)
        if rule is None or len(data) < 2:
            return Answer(data)
        body, sw = data[:-2], data[-2:]
        if rule == LE:
            if not body:
                return Answer(data)
            self._tell(LE, events.PresentationApplied(
                LE, "case-4 command", "Le added for the T=1 card; data served as 61xx"))
            return Answer(data, defer=True)
        if sw != _OK:
            return Answer(data)
        fix = clear_ext_length if rule == EXT_LENGTH else _cap_max_length
        what = "GET DATA 5F52" if rule == EXT_LENGTH else "GET DATA 006E"
        try:
            changed = fix(body)
        except (AtrError, TlvError, Garbage) as exc:
            self._tell(rule, events.PresentationSkipped(rule, what, str(exc)))
            return Answer(data)
        if changed != body:
            detail = ("extended Lc/Le cleared" if rule == EXT_LENGTH
                      else "7F66 capped to short APDU lengths")
            self._tell(rule, events.PresentationApplied(rule, what, detail))
        return Answer(changed + sw)


__all__ = ["RULES", "Answer", "Garbage", "Presentation"]
