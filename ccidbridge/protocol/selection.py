"""Which application the guest has selected on each logical channel, sans-IO.

The PIN-retry guard (guard.py) and the APDU policy (policy.py) both need it:
a PIN reference means a different counter in each application (OpenPGP's
PW1 81 is not PIV's PIN 80), and a policy rule may name an application.  The
rules, stated once here:

S1  The application is the DF name (AID) of the last SELECT by DF name
    (INS A4, P1 04) the card answered with success (9000, 61xx or a 62xx/63xx
    warning), as the guest wrote it: possibly a prefix of the full AID
    (partial selection, ISO/IEC 7816-4 §11.2.2).  (docs/middleware-facts.md#M12)
S2  A failed SELECT by DF name leaves the selection as it was (ISO/IEC 7816-4:
    the current DF stays); other SELECT forms (by file identifier, path,
    parent) select files inside the application and leave it too.
S3  Each logical channel has its own selection.  The channel comes from CLA:
    first interindustry classes (b8 b7 = 00) and proprietary ones (b8 = 1)
    carry it in b2 b1 (0-3), further interindustry classes (b8 b7 = 01) in b4..b1
    (4-19).  (ISO/IEC 7816-4 §5.4.1, docs/middleware-facts.md#M12)
S4  After a card reset (power-up, reinsertion) nothing is known: the card's
    implicit application is unknown (``None``).  The same holds for a channel
    MANAGE CHANNEL (INS 70) opened or closed: what a new channel holds is the
    card's choice.
"""

from __future__ import annotations

INS_SELECT = 0xA4
INS_MANAGE_CHANNEL = 0x70
P1_BY_DF_NAME = 0x04
#: The INS codes whose answers change the selection (S1, S4).
WATCHED = frozenset({INS_SELECT, INS_MANAGE_CHANNEL})


def channel(cla: int) -> int:
    """The logical channel a class byte addresses (S3)."""
    if cla & 0xC0 == 0x40:
        return 4 + (cla & 0x0F)
    return cla & 0x03


def succeeded(response: bytes) -> bool:
    """9000, 61xx (more data) or a warning (62xx, 63xx): the command was executed."""
    if len(response) < 2:
        return False
    return response[-2] in (0x61, 0x62, 0x63) or response[-2:] == b"\x90\x00"


def selected_aid(apdu: bytes) -> bytes | None:
    """The DF name a SELECT by DF name asks for, or None for any other command."""
    if len(apdu) < 6 or apdu[1] != INS_SELECT or apdu[2] != P1_BY_DF_NAME:
        return None
    lc = apdu[4]
    if lc == 0:  # extended Lc
        if len(apdu) < 8:
            return None
        lc = int.from_bytes(apdu[5:7], "big")
        data = apdu[7 : 7 + lc]
    else:
        data = apdu[5 : 5 + lc]
    return bytes(data) if len(data) == lc and lc else None


class Selection:
    """The selected application per logical channel (S1..S4)."""

    __slots__ = ("_aids",)

    def __init__(self) -> None:
        self._aids: dict[int, bytes] = {}

    def current(self, cla: int) -> bytes | None:
        """The AID selected on ``cla``'s channel, or None if unknown (S4)."""
        return self._aids.get(channel(cla))

    def answered(self, apdu: bytes, response: bytes) -> bool:
        """Learn from one exchange; True if the selection changed (S1, S2, S4)."""
        if len(apdu) >= 4 and apdu[1] == INS_MANAGE_CHANNEL:
            if response[-2:] != b"\x90\x00":
                return False
            if apdu[2] == 0x80:  # close: P2, or 00 for the channel CLA names
                which = apdu[3] or channel(apdu[0])
            else:  # open: P2, or 00 for the one the card assigns (its answer's first byte)
                which = apdu[3] or (response[0] if len(response) == 3 else 0)
            return self._aids.pop(which, None) is not None
        aid = selected_aid(apdu)
        if aid is None or not succeeded(response):
            return False
        self._aids[channel(apdu[0])] = aid
        return True

    def forget(self) -> None:
        """The card was reset or replaced (S4)."""
        self._aids.clear()


__all__ = ["Selection", "channel", "selected_aid", "succeeded"]
