"""PC/SC result codes: their names, and what each says about the card.

The groups are facts about pcsc-lite (docs/pcsc-lite.md): which results mean
the service is gone for this context, the card is gone, the reader is gone.
"""

from __future__ import annotations

from smartcard import scard

OK = scard.SCARD_S_SUCCESS
E_TIMEOUT = scard.SCARD_E_TIMEOUT
E_CANCELLED = scard.SCARD_E_CANCELLED
E_NO_READERS = scard.SCARD_E_NO_READERS_AVAILABLE
E_SHARING = scard.SCARD_E_SHARING_VIOLATION
E_PROTO = scard.SCARD_E_PROTO_MISMATCH
W_RESET = scard.SCARD_W_RESET_CARD

#: The service went away: this context is dead for good (docs/pcsc-lite.md#P1).
SERVICE_GONE = frozenset(
    {
        scard.SCARD_F_COMM_ERROR,
        scard.SCARD_E_NO_SERVICE,
        scard.SCARD_E_SERVICE_STOPPED,
        scard.SCARD_E_INVALID_HANDLE,
    }
)
CARD_GONE = frozenset(
    {scard.SCARD_W_REMOVED_CARD, scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_UNPOWERED_CARD}
)
READER_GONE = frozenset({scard.SCARD_E_UNKNOWN_READER, scard.SCARD_E_READER_UNAVAILABLE})
#: Results that say what happened to the card (as opposed to one failed exchange).
HANDLED = SERVICE_GONE | CARD_GONE | READER_GONE | {W_RESET}


def _names() -> dict[int, str]:
    names: dict[int, str] = {}
    for key, value in vars(scard).items():
        if key.startswith(("SCARD_E_", "SCARD_W_", "SCARD_F_", "SCARD_P_")) and isinstance(
            value, int
        ):
            names.setdefault(value & 0xFFFFFFFF, key)
    return names


_NAMES = _names()


def hr_text(hr: int) -> str:
    """``SCARD_E_NOT_TRANSACTED (0x80100016)`` for a PC/SC result code."""
    hr &= 0xFFFFFFFF
    return f"{_NAMES.get(hr, 'PC/SC error')} (0x{hr:08X})"


def hr_name(hr: int) -> str:
    """``SCARD_E_NO_SERVICE`` (just the name) for one-line messages."""
    hr &= 0xFFFFFFFF
    return _NAMES.get(hr, f"0x{hr:08X}")
