"""The lab's pcscd stack and our vpcd test card, against the real pcscd 1.9.9 + vpcd."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import pytest
from smartcard import scard
from smartcard.CardConnection import CardConnection
from smartcard.System import readers as system_readers

from lab import pcsc as lab_pcsc
from lab.pcsc import (
    HostConnection,
    LabError,
    PcscStack,
    reader_names,
    wait_card_state,
)
from lab.vpcd_card import ATR_PRESETS, pattern

pytestmark = pytest.mark.stack

OK = scard.SCARD_S_SUCCESS


def _hr(hr: int) -> int:
    return hr & 0xFFFFFFFF


def test_refuses_outside_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCIDBRIDGE_ISOLATED", raising=False)
    with pytest.raises(LabError, match="isolated"):
        PcscStack(1).start()


def test_vpcd_slots_ports_and_names() -> None:
    slots = lab_pcsc.vpcd_slots(3)
    assert [(s.name, s.port) for s in slots] == [
        ("Virtual PCD 00 00", 35963),
        ("Virtual PCD 00 01", 35964),
        ("Virtual PCD B 00 00", 35965),
        ("Virtual PCD B 00 01", 35966),
        ("Virtual PCD C 00 00", 35967),
        ("Virtual PCD C 00 01", 35968),
    ]


def test_readers_listed(pcsc_stack: PcscStack, record_property) -> None:  # noqa: ANN001
    assert pcsc_stack.running
    assert reader_names() == pcsc_stack.readers
    # the high-level API agrees
    assert [str(r) for r in system_readers()] == pcsc_stack.readers
    assert pcsc_stack.start_seconds is not None and pcsc_stack.start_seconds < 2.0
    record_property("pcscd_start_s", round(pcsc_stack.start_seconds, 4))
    assert "daemon ready" in pcsc_stack.log_path.read_text()


T0, T1 = scard.SCARD_PROTOCOL_T0, scard.SCARD_PROTOCOL_T1


@pytest.mark.parametrize(
    ("preset", "ask", "got"),
    [("t0", T0 | T1, T0), ("t1", T0 | T1, T1), ("dual", T0, T0), ("dual", T0 | T1, T1)],
)
def test_card_apdus(test_card, preset: str, ask: int, got: int) -> None:  # noqa: ANN001
    card = test_card(preset, process=False)
    assert card.inserted_state is not None and card.inserted_state.atr == ATR_PRESETS[preset]
    with HostConnection(card.reader, protocol=ask) as c:
        assert c.proto == got  # pcscd prefers T=1 when the ATR offers both
        assert c.ok("0084000008") == pattern(8) + b"\x90\x00"
        assert c.ok("00A4040C07F0636369646272") == b"\x90\x00"
        assert c.ok("00A4040007F0636369646272").startswith(b"\x6f")
        assert c.ok("00A4040C03A0A0A0") == b"\x6a\x82"
        assert c.ok("00B0000010") == b"\x69\x86"  # no EF selected
        assert c.ok("00A4000C020101") == b"\x90\x00"
        assert c.ok("00B0001004") == pattern(4, 0x10) + b"\x90\x00"
        assert c.ok("002000000431323335") == b"\x63\xc2"
        assert c.ok("002000000431323336") == b"\x63\xc1"
        assert c.ok("002000000431323334") == b"\x90\x00"
        assert c.ok("0020000000") == b"\x90\x00"
        assert c.ok("801000000401020304") == b"\x01\x02\x03\x04\x90\x00"
        assert c.ok("80126A82") == b"\x6a\x82"
        assert c.ok("00EE0000") == b"\x6d\x00"
        for n in (258, 374, 375, 1000, 4096):
            assert c.ok(f"8010{n:04X}00") == pattern(n) + b"\x90\x00"
        # extended-length Le passes vpcd too
        assert c.ok("80100000000400") == pattern(1024) + b"\x90\x00"


def test_t1_only_atr_rejects_t0(test_card) -> None:  # noqa: ANN001
    card = test_card("t1", process=False)
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    try:
        hr, h, _ = scard.SCardConnect(
            ctx, card.reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0
        )
        assert _hr(hr) == 0x8010000F  # SCARD_E_PROTO_MISMATCH
    finally:
        scard.SCardReleaseContext(ctx)


def test_high_level_pyscard(test_card) -> None:  # noqa: ANN001
    card = test_card("t1", process=False)
    r = next(r for r in system_readers() if str(r) == card.reader)
    conn = r.createConnection()
    conn.connect(protocol=CardConnection.T1_protocol)
    try:
        data, sw1, sw2 = conn.transmit([0x00, 0x84, 0x00, 0x00, 0x10])
        assert (len(data), sw1, sw2) == (16, 0x90, 0x00)
    finally:
        conn.disconnect()


def test_card_process_answers_every_apdu(test_card, record_property) -> None:  # noqa: ANN001
    """550 APDUs through pcscd to our card process, each answered.  Its speed (docs/lab.md#V6:
    ~0.1 ms, 44 ms if the QUICKACK fix were gone) is measured by make bench, not asserted."""
    card = test_card("dual")
    assert card.pid is not None
    with HostConnection(card.reader) as c:
        for _ in range(50):
            c.ok("0084000008")
        times = []
        for _ in range(500):
            t = time.perf_counter()
            resp = c.ok("0084000008")
            times.append(time.perf_counter() - t)
            assert resp[-2:] == b"\x90\x00"
    record_property("apdu_median_us", round(statistics.median(times) * 1e6, 1))


def test_removal_and_insertion_detected(test_card, record_property) -> None:  # noqa: ANN001
    card = test_card("dual")
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    seen: list[tuple[float, int]] = []
    try:
        hr, st = scard.SCardGetStatusChange(ctx, 0, [(card.reader, scard.SCARD_STATE_UNAWARE)])
        assert hr == OK and st[0][1] & scard.SCARD_STATE_PRESENT

        def watch() -> None:
            cur = st[0][1] & ~scard.SCARD_STATE_CHANGED
            for _ in range(2):
                hr2, st2 = scard.SCardGetStatusChange(ctx, 5000, [(card.reader, cur)])
                if hr2 != OK:
                    return
                cur = st2[0][1] & ~scard.SCARD_STATE_CHANGED
                seen.append((time.monotonic(), cur))

        w = threading.Thread(target=watch)
        w.start()
        t_kill = time.monotonic()
        card.kill(wait=False)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.005)
        t_ins = time.monotonic()
        card.insert(wait=False)
        w.join(6)
        assert not w.is_alive()
    finally:
        scard.SCardReleaseContext(ctx)
    assert len(seen) == 2
    assert seen[0][1] & scard.SCARD_STATE_EMPTY
    assert seen[1][1] & scard.SCARD_STATE_PRESENT
    removal, insertion = seen[0][0] - t_kill, seen[1][0] - t_ins
    record_property("removal_s", round(removal, 3))
    record_property("insertion_s", round(insertion, 3))  # pcscd polls vpcd every 400 ms


def test_crash_gives_empty_response_then_removal(test_card) -> None:  # noqa: ANN001
    card = test_card("dual", ["crash=B0"])
    with HostConnection(card.reader) as c:
        assert c.ok("0084000004")[-2:] == b"\x90\x00"
        assert c.tx("00B0000004") == (OK, b"")  # rv=0, empty (docs/lab.md#V7)
        assert c.tx("0084000004")[0] == 0x80100016  # SCARD_E_NOT_TRANSACTED
    wait_card_state(card.reader, False, 3)
    assert card.card is not None and card.card.poll() == 1


def test_hang_blocks_until_card_killed(test_card) -> None:  # noqa: ANN001
    card = test_card("dual", ["hang=88"])
    result: list[tuple[int, bytes]] = []
    with HostConnection(card.reader) as c:
        t = threading.Thread(target=lambda: result.append(c.tx("0088000000")))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not result  # pcscd has no timeout (docs/lab.md#V7)
        card.kill(wait=False)
        t.join(5)
        assert not t.is_alive()
    assert result and result[0][1] in (b"",)  # rv=0 with an empty response


def test_sigstop_hangs_and_sigcont_resumes(test_card) -> None:  # noqa: ANN001
    card = test_card("dual")
    with HostConnection(card.reader) as c:
        c.ok("0084000001")
        card.sigstop()
        result: list[tuple[int, bytes]] = []
        t = threading.Thread(target=lambda: result.append(c.tx("0084000002")))
        t.start()
        t.join(0.3)
        assert t.is_alive()
        card.sigcont()
        t.join(5)
        assert result and result[0][0] == OK and result[0][1][-2:] == b"\x90\x00"


def test_slow_card(test_card) -> None:  # noqa: ANN001
    card = test_card("dual", ["slow=50"], process=False)
    with HostConnection(card.reader) as c:
        t = time.perf_counter()
        c.ok("0084000001")
        assert time.perf_counter() - t >= 0.05


def test_slots_are_independent(test_card, pcsc_stack: PcscStack) -> None:  # noqa: ANN001
    """Every slot of every entry talks to its own card (vpcd driver copy per entry)."""
    cards = [test_card(bytes([0x3B, 0x01, i]), process=False) for i in range(len(pcsc_stack.slots))]
    for i, card in enumerate(cards):
        assert wait_card_state(card.reader, True, 2).atr == bytes([0x3B, 0x01, i])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_pcscd_restart_reinserts(pcsc_stack: PcscStack, test_card, sig: int) -> None:  # noqa: ANN001
    card = test_card("t1", process=False)
    with HostConnection(card.reader) as c:
        c.ok("0084000001")
    pcsc_stack.restart(reinsert=True, sig=sig)
    with HostConnection(card.reader) as c:
        assert c.ok("8014000004") == b"\x00\x00\x00\x01\x90\x00"  # a fresh card


def test_pcscd_restart(pcsc_stack: PcscStack, test_card) -> None:  # noqa: ANN001
    card = test_card("dual")
    hr, old_ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == OK
    old_pid = pcsc_stack.pid
    pcsc_stack.restart()
    assert pcsc_stack.pid != old_pid and pcsc_stack.running
    assert reader_names() == pcsc_stack.readers
    # old contexts stay dead (docs/lab.md#V3)
    hr, _ = scard.SCardListReaders(old_ctx, [])
    assert _hr(hr) == 0x8010001D
    scard.SCardReleaseContext(old_ctx)
    # the card process saw EOF and exited; re-insert it
    assert card.card is not None
    assert card.card.proc is not None
    card.card.proc.wait(5)
    card.restart()
    with HostConnection(card.reader) as c:
        assert c.ok("0084000002")[-2:] == b"\x90\x00"
    assert os.path.exists("/run/pcscd/pcscd.comm")


def test_more_readers_on_demand(pcsc_stack: PcscStack, test_card) -> None:  # noqa: ANN001
    """ensure_slots() grows the stack (pcscd restart); the new entry's slots work."""
    pcsc_stack.ensure_slots(6)
    assert len(pcsc_stack.slots) >= 6
    assert reader_names() == pcsc_stack.readers
    card = test_card("t1", reader="Virtual PCD C 00 01", process=False)
    assert card.port == 35968
    with HostConnection(card.reader) as c:
        assert c.ok("80120000") == b"\x00\x00"
