"""Direct host-side PC/SC access, the yardstick for what the bridge relays."""

from __future__ import annotations

from smartcard import scard


def direct_transmit(reader: str, apdus: list[bytes]) -> list[bytes]:
    """The APDUs straight through pyscard (shared, T0|T1, leaving the card as it is)."""
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0
    try:
        hr, card, proto = scard.SCardConnect(
            ctx,
            reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        assert hr == 0, scard.SCardGetErrorMessage(hr)
        out = []
        for apdu in apdus:
            hr, resp = scard.SCardTransmit(card, proto, list(apdu))
            assert hr == 0, scard.SCardGetErrorMessage(hr)
            out.append(bytes(resp))
        scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        return out
    finally:
        scard.SCardReleaseContext(ctx)
