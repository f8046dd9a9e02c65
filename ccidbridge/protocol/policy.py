"""The APDU policy of one card, sans-IO: which guest commands may reach it.

The rules come from ``<policy>`` (``ccidbridge.spec.ApduPolicy``), and are
applied like this, each tagged where it is enforced:

P1  Rules are tried in document order; the first that matches decides.  A
    command no rule matches is allowed: no ``<policy>``, no restriction.
P2  A rule matches when each header byte it names (cla, ins, p1, p2: a set of
    values, ranges and masks expanded by the parser) has one of its values,
    and, when it names ``aid``, the application selected on the command's
    logical channel (selection.py) matches it (P3).
P3  ``aid`` is a DF-name prefix.  The selection matches *surely* when the
    selected AID starts with it, *possibly* when the guest selected a shorter,
    partial AID that the prefix extends (the card may have picked that
    application) or when nothing is known of the selection (after a reset the
    card's implicit application may be it).  A ``<deny>`` applies when the
    selection matches surely or possibly; an ``<allow>`` only when surely:
    doubt never opens a door.
P4  A denied command is answered 6985, "conditions of use not satisfied",
    without reaching the card: a final "not allowed" that both OpenSC
    (SC_ERROR_NOT_ALLOWED) and GnuPG (GPG_ERR_USE_CONDITIONS) report as such.
    6986 reads as "no current EF" to newer GnuPG (ENOENT), 6D00/6A81 as "the card
    cannot" (middleware tries other command forms), 6982 as "log in first"
    (a PIN prompt; GnuPG: bad PIN).  (docs/middleware-facts.md#M15)
P5  A command shorter than a header (4 bytes) is not a command: no rule
    applies, the card answers it with an error of its own.
P6  ENVELOPE (C2/C3) may wrap any command: a rule for the wrapped INS cannot
    see inside, so deny C2-C3 too where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.protocol.selection import Selection
from ccidbridge.spec import ApduPolicy, PolicyRule

SW_DENIED = b"\x69\x85"


@dataclass(frozen=True, slots=True)
class Denial:
    """``rule`` (its index in the policy) denied the command: answer ``sw``."""

    sw: bytes
    rule: int
    reason: str


def aid_match(prefix: bytes, selected: bytes | None) -> tuple[bool, bool]:
    """(surely, possibly) for a rule's ``aid`` against the selection (P3)."""
    if selected is None:
        return False, True
    if selected.startswith(prefix):
        return True, True
    return False, prefix.startswith(selected)


def _bytes_match(rule: PolicyRule, apdu: bytes) -> bool:
    return (
        (rule.cla is None or apdu[0] in rule.cla)
        and (rule.ins is None or apdu[1] in rule.ins)
        and (rule.p1 is None or apdu[2] in rule.p1)
        and (rule.p2 is None or apdu[3] in rule.p2)
    )


class Policy:
    """Applies one card's :class:`ApduPolicy` (P1..P6)."""

    __slots__ = ("rules", "_selection", "_by_ins")

    def __init__(self, policy: ApduPolicy, selection: Selection | None = None) -> None:
        self.rules = policy.rules
        self._selection = selection if selection is not None else Selection()
        # The rules that can match each INS, in order: a command whose INS no rule
        # names costs one list index (benchmarks/safety.py).
        self._by_ins: list[tuple[int, ...]] = [
            tuple(i for i, r in enumerate(self.rules) if r.ins is None or ins in r.ins)
            for ins in range(256)
        ]

    def check(self, apdu: bytes) -> Denial | None:
        """A denial (P4), or None to send ``apdu`` on (P1)."""
        if len(apdu) < 4:  # P5
            return None
        rules = self.rules
        for i in self._by_ins[apdu[1]]:
            rule = rules[i]
            if not _bytes_match(rule, apdu):
                continue
            if rule.aid is not None:
                surely, possibly = aid_match(rule.aid, self._selection.current(apdu[0]))
                if not (surely if rule.allow else possibly):
                    continue
            if rule.allow:
                return None
            return Denial(SW_DENIED, i, f"denied by {rule.text} (line {rule.line}): answered "
                          f"{SW_DENIED.hex().upper()} without asking the card")
        return None


__all__ = ["SW_DENIED", "Denial", "Policy", "aid_match"]
