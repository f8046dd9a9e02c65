"""Debian's real vicc through the lab's fixed wrapper: the 'real emulator' smoke test."""

from __future__ import annotations

import statistics
import time

import pytest
from smartcard import scard

from lab.pcsc import LabError, PcscStack, wait_card_state
from lab.vicc import VICC_ATR, ViccProcess

pytestmark = pytest.mark.stack


def test_vicc_smoke(vicc_card: ViccProcess, record_property) -> None:  # noqa: ANN001
    state = wait_card_state(vicc_card.reader, True, 1)
    assert state.atr == VICC_ATR
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0
    try:
        hr, h, proto = scard.SCardConnect(
            ctx, vicc_card.reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
        )
        assert hr == 0 and proto == scard.SCARD_PROTOCOL_T1
        times = []
        for _ in range(50):
            t = time.perf_counter()
            hr, resp = scard.SCardTransmit(h, proto, [0x00, 0x84, 0x00, 0x00, 0x08])
            times.append(time.perf_counter() - t)
            assert hr == 0 and len(resp) == 10 and resp[-2:] == [0x90, 0x00]
        hr, resp = scard.SCardTransmit(h, proto, list(bytes.fromhex("002000000431323334")))
        assert (hr, resp) == (0, [0x90, 0x00])
        scard.SCardDisconnect(h, scard.SCARD_LEAVE_CARD)
    finally:
        scard.SCardReleaseContext(ctx)
    # its speed (44 ms per APDU without the QUICKACK fix) is make bench's, not asserted here
    record_property("vicc_apdu_median_us", round(statistics.median(times) * 1e6, 1))


def test_vicc_refuses_without_pcscd(pcsc_stack: PcscStack) -> None:
    stopped = PcscStack(1)  # never started
    with pytest.raises(LabError, match="pcscd"):
        ViccProcess(stopped, pcsc_stack.slots[0]).start()


def test_vicc_remove_and_reinsert(vicc_card: ViccProcess) -> None:
    """Removal is 'kill vicc'; re-insertion is a new vicc on the same slot (docs/lab.md#V9)."""
    first_pid = vicc_card.pid
    assert vicc_card.stop() is not None  # waits for EMPTY
    state = vicc_card.start()
    assert state.present and state.atr == VICC_ATR
    assert vicc_card.pid != first_pid
