"""Every reader pcscd knows, with card state and ATR: ``ccidbridge readers`` and the lab."""

from __future__ import annotations

from dataclasses import dataclass

from smartcard import scard

from ccidbridge.card import errors as pe
from ccidbridge.card.choice import usable


class PcscUnavailable(RuntimeError):
    """PC/SC cannot be used at all; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class ReaderInfo:
    name: str
    card_present: bool
    atr: bytes | None


def _unavailable(hr: int) -> PcscUnavailable:
    if hr & 0xFFFFFFFF in pe.SERVICE_GONE:
        return PcscUnavailable(f"pcscd is not running ({pe.hr_name(hr)})")
    return PcscUnavailable(f"PC/SC is not usable ({pe.hr_text(hr)})")


def reader_infos() -> list[ReaderInfo]:
    """One GetStatusChange over every reader, no connect.

    pyscard's ``readers()`` raises a bare EstablishContextException when pcscd
    is down (docs/pcsc-lite.md#P1); this raises :class:`PcscUnavailable`.
    """
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != pe.OK:
        raise _unavailable(hr)
    try:
        hr, names = scard.SCardListReaders(ctx, [])
        if hr == pe.E_NO_READERS:
            return []
        if hr != pe.OK:
            raise _unavailable(hr)
        hr, states = scard.SCardGetStatusChange(
            ctx, 0, [(n, scard.SCARD_STATE_UNAWARE) for n in names]
        )
        if hr != pe.OK:
            raise _unavailable(hr)
        out = []
        for name, event, atr in states:
            present = usable(event)
            out.append(ReaderInfo(name, present, bytes(atr) if present and atr else None))
        return out
    finally:
        scard.SCardReleaseContext(ctx)


def reader_names() -> list[str]:
    """Just the names, in pcscd's order."""
    return [info.name for info in reader_infos()]
