"""What stands between the guest and the card: the APDU policy, then the PIN guard.

One object per served card, sans-IO, driven by the APDU thread: every guest
command goes through :meth:`Gate.check` before the card and every card answer
through :meth:`Gate.answered` after it.  Both share one :class:`Selection`.
The policy decides first (a denied command is never a PIN try); a command
neither refuses goes to the card.

The hot path: a command whose INS neither the guard nor the selection watch,
on a card without policy rules, costs one tuple test and one set lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.protocol import guard, selection
from ccidbridge.protocol.guard import PinGuard
from ccidbridge.protocol.policy import Policy
from ccidbridge.protocol.selection import Selection
from ccidbridge.spec import ApduPolicy, PinGuardSpec

#: Every INS whose command or answer the gate must see (the rest pass untouched).
WATCHED = guard.WATCHED | selection.WATCHED


@dataclass(frozen=True, slots=True)
class Refusal:
    """Answer ``sw`` to the guest instead of asking the card.

    ``first``: the first refusal by this rule since the card was last inserted
    (the policy's are logged once per rule, the guard's every time: each is a
    PIN prompt the guest's user sees fail).
    """

    sw: bytes
    reason: str
    by: str  # "policy" or "pin-guard"
    first: bool


class Gate:
    __slots__ = ("_policy", "_guard", "_selection", "_said")

    def __init__(self, guard: PinGuardSpec, policy: ApduPolicy) -> None:
        self._selection = Selection()
        self._policy = Policy(policy, self._selection) if policy.rules else None
        self._guard = PinGuard(guard.keep, self._selection)
        self._said: set[int] = set()

    def check(self, apdu: bytes) -> Refusal | None:
        if self._policy is not None:
            denial = self._policy.check(apdu)
            if denial is not None:
                first = denial.rule not in self._said
                self._said.add(denial.rule)
                return Refusal(denial.sw, denial.reason, "policy", first)
        if len(apdu) > 1 and apdu[1] in WATCHED:
            refusal = self._guard.check(apdu)
            if refusal is not None:
                return Refusal(refusal.sw, refusal.reason, "pin-guard", True)
        return None

    def answered(self, apdu: bytes, response: bytes) -> None:
        if len(apdu) > 1 and apdu[1] in WATCHED:
            self._guard.answered(apdu, response)
            self._selection.answered(apdu, response)

    def forget(self) -> None:
        """The card was reset, removed or replaced: nothing is known any more."""
        self._selection.forget()
        self._guard.forget()
        self._said.clear()


__all__ = ["Gate", "Refusal"]
