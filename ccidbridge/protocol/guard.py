"""The PIN-retry guard, sans-IO: the guest may not spend a PIN's last tries.

:class:`PinGuard` is shown every command before it goes to the card
(:meth:`PinGuard.check`) and every answer after (:meth:`PinGuard.answered`).
It never sends anything itself: it only follows what the card reports.  Its
rules, each tagged where it is enforced:

G1  The counters followed are those of the commands that spend a try, in every
    INS form and under any class byte: VERIFY (20/21), CHANGE REFERENCE DATA
    (24/25) and RESET RETRY COUNTER (2C/2D).  VERIFY and CHANGE REFERENCE DATA
    spend the try counter of the reference data P2 names; RESET RETRY COUNTER
    spends that of the resetting code (a PUK; OpenPGP's reset code), which is
    its own counter.  (docs/middleware-facts.md#M13)
G2  A counter belongs to one application on one logical channel (selection.py):
    the same P2 in two applications is two counters.  In OpenPGP (AID prefix
    D2 76 00 01 24 01) P2 81 and 82 are both PW1.  (docs/middleware-facts.md#M14)
G3  A command spends a try only if it carries data and asks for a check:
    VERIFY with P1 00 (P1 FF only resets the verification status), CHANGE
    REFERENCE DATA with P1 00 (01: new data only), RESET RETRY COUNTER with
    P1 00 or 01 (02, 03: no resetting code).  VERIFY without data asks for the
    counter and spends nothing.  (ISO/IEC 7816-4 §11.5.6-11.5.10,
    docs/middleware-facts.md#M13)
G4  What the card reports sets the counter: 63Cx = x tries left; 6983 = none
    (blocked); 6300 (failed, no count) = one less than known; success (9000)
    after a check = reset, the counter is unknown again until the card
    reports it.  RESET RETRY COUNTER's success also resets the counter of the
    reference it unblocked.  OpenPGP also reports PW1, reset code and PW3 in
    the PW status bytes (DO C4, in GET DATA 00C4 and inside 006E/73).
    (docs/middleware-facts.md#M14)
G5  A command that spends a try is refused while its counter is known and at
    most ``keep`` (default 1): the guest would leave fewer than ``keep`` tries.
    The refusal is answered 6983, "authentication method blocked", without
    reaching the card: for the guest the PIN is blocked (by the bridge), and
    middleware has a path for it that does not retry (OpenSC
    SC_ERROR_AUTH_METHOD_BLOCKED, GnuPG "PIN blocked"), where 63Cx would make
    it count down and prompt again.  (docs/middleware-facts.md#M15)
G6  An unknown counter allows the command (and is learned from its answer).
G7  After a card reset or reinsertion nothing is known (it may be another card).
G8  ``keep = 0`` switches the guard off.
G9  ENVELOPE (C2/C3) is not looked into: a PIN command wrapped in one is not
    followed (deny C2-C3 with ``<policy>`` where that matters).
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.protocol.selection import Selection, channel
from ccidbridge.protocol.tlv import TlvError, read_tlv

INS_VERIFY = frozenset({0x20, 0x21})
INS_CHANGE = frozenset({0x24, 0x25})
INS_RESET = frozenset({0x2C, 0x2D})
INS_GET_DATA = frozenset({0xCA, 0xCB})
#: Every INS the guard looks at (G1, G4), for the gate's cheap first test.
WATCHED = INS_VERIFY | INS_CHANGE | INS_RESET | INS_GET_DATA
#: What a refused command is answered with (G5).
SW_REFUSED = b"\x69\x83"
OPENPGP_AID = bytes.fromhex("D27600012401")


@dataclass(frozen=True, slots=True)
class PinRefusal:
    """The guard refused ``apdu``: answer ``sw`` instead, log ``reason`` as a warning."""

    sw: bytes
    reason: str


def carries_data(apdu: bytes) -> bool:
    """Case 3/4 (Lc present), short or extended; case 1/2 carry none."""
    n = len(apdu)
    return n > 5 and not (n == 7 and apdu[4] == 0)


def _is_openpgp(aid: bytes | None) -> bool:
    return aid is not None and (aid.startswith(OPENPGP_AID) or
                                (len(aid) >= 5 and OPENPGP_AID.startswith(aid)))


def counter_of(apdu: bytes, aid: bytes | None) -> str | None:
    """The counter a PIN command uses (G1, G2), or None if it is no PIN command."""
    ins, p1, p2 = apdu[1], apdu[2], apdu[3]
    openpgp = _is_openpgp(aid)
    if ins in INS_VERIFY or ins in INS_CHANGE:
        if openpgp and p2 in (0x81, 0x82):
            return "PW1"
        if openpgp and p2 == 0x83:
            return "PW3"
        return f"reference {p2:02X}"
    if ins in INS_RESET:
        if openpgp and p2 == 0x81 and p1 == 0x00:
            return "RC"
        return f"resetting code of {p2:02X}"
    return None


def reset_target(apdu: bytes, aid: bytes | None) -> str:
    """The counter RESET RETRY COUNTER's success resets (G4)."""
    p2 = apdu[3]
    if _is_openpgp(aid) and p2 in (0x81, 0x82):
        return "PW1"
    return f"reference {p2:02X}"


def spends_a_try(apdu: bytes) -> bool:
    """G3."""
    if not carries_data(apdu):
        return False
    ins, p1 = apdu[1], apdu[2]
    if ins in INS_VERIFY or ins in INS_CHANGE:
        return p1 == 0x00
    if ins in INS_RESET:
        return p1 in (0x00, 0x01)
    return False


def pw_status(value: bytes) -> dict[str, int] | None:
    """OpenPGP's PW status bytes (DO C4): PW1, reset code and PW3 tries left."""
    if len(value) < 7:
        return None
    return {"PW1": value[4], "RC": value[5], "PW3": value[6]}


def _tlvs(data: bytes) -> list[tuple[int, bytes]] | None:
    """One level of BER-TLV (tlv.py), padding bytes 00/FF skipped; None if malformed."""
    out = []
    pos = 0
    try:
        while pos < len(data):
            if data[pos] in (0x00, 0xFF):
                pos += 1
                continue
            tag, start, end = read_tlv(data, pos)
            out.append((tag, data[start:end]))
            pos = end
    except TlvError:
        return None
    return out


def find_pw_status(tag: int, data: bytes) -> bytes | None:
    """DO C4 in the answer to GET DATA ``tag`` (00C4, or 006E holding 73 holding C4)."""
    if tag == 0x00C4:
        return data
    if tag != 0x006E:
        return None
    level = _tlvs(data)
    if level and len(level) == 1 and level[0][0] == 0x6E:  # answered with its own tag
        level = _tlvs(level[0][1])
    for t, value in level or ():
        if t == 0x73:
            for t2, v2 in _tlvs(value) or ():
                if t2 == 0xC4:
                    return v2
    return None


class PinGuard:
    """Follows the PIN counters of one card (G1..G8); see the module docstring."""

    __slots__ = ("keep", "_selection", "_tries")

    def __init__(self, keep: int = 1, selection: Selection | None = None) -> None:
        self.keep = keep
        self._selection = selection if selection is not None else Selection()
        self._tries: dict[tuple[int, bytes | None, str], int] = {}

    def _key(self, apdu: bytes, name: str) -> tuple[int, bytes | None, str]:
        return (channel(apdu[0]), self._selection.current(apdu[0]), name)

    def tries(self, apdu: bytes) -> int | None:
        """What the guard knows of the counter ``apdu`` would spend (None: unknown)."""
        name = counter_of(apdu, self._selection.current(apdu[0]))
        return None if name is None else self._tries.get(self._key(apdu, name))

    def check(self, apdu: bytes) -> PinRefusal | None:
        """Before the card: a refusal (G5), or None to send ``apdu`` on (G6, G8)."""
        if self.keep <= 0 or len(apdu) < 4 or not spends_a_try(apdu):
            return None
        aid = self._selection.current(apdu[0])
        name = counter_of(apdu, aid)
        if name is None:
            return None
        left = self._tries.get(self._key(apdu, name))
        if left is None or left > self.keep:
            return None
        where = f" of application {aid.hex().upper()}" if aid else ""
        return PinRefusal(
            SW_REFUSED,
            f"{name}{where} has {left} {'try' if left == 1 else 'tries'} left and "
            f"<pin-guard keep='{self.keep}'/> keeps {self.keep}: answered "
            f"{SW_REFUSED.hex().upper()} without asking the card",
        )

    def answered(self, apdu: bytes, response: bytes) -> None:
        """After the card: learn the counters it reported (G4)."""
        if len(apdu) < 4 or len(response) < 2:
            return
        ins = apdu[1]
        if ins in INS_GET_DATA:
            self._learn_pw_status(apdu, response)
            return
        aid = self._selection.current(apdu[0])
        name = counter_of(apdu, aid)
        if name is None:
            return
        key = self._key(apdu, name)
        sw1, sw2 = response[-2], response[-1]
        if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
            self._tries[key] = sw2 & 0x0F
        elif sw1 == 0x69 and sw2 == 0x83:
            self._tries[key] = 0
        elif sw1 == 0x63 and sw2 == 0x00 and spends_a_try(apdu):
            if key in self._tries:
                self._tries[key] = max(0, self._tries[key] - 1)
        elif sw1 == 0x90 and sw2 == 0x00 and spends_a_try(apdu):
            self._tries.pop(key, None)
            if ins in INS_RESET:
                self._tries.pop(self._key(apdu, reset_target(apdu, aid)), None)

    def _learn_pw_status(self, apdu: bytes, response: bytes) -> None:
        if response[-2:] != b"\x90\x00" or not _is_openpgp(self._selection.current(apdu[0])):
            return
        value = find_pw_status((apdu[2] << 8) | apdu[3], response[:-2])
        status = pw_status(value) if value is not None else None
        for name, left in (status or {}).items():
            self._tries[self._key(apdu, name)] = left

    def forget(self) -> None:
        """G7 (the selection is the caller's to forget)."""
        self._tries.clear()


__all__ = ["SW_REFUSED", "WATCHED", "PinGuard", "PinRefusal"]
