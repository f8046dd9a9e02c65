"""The PC/SC card side against the real stack: pcscd 1.9.9 + vpcd + our test card (and vicc).

Every wait is on real state (sink calls, pcscd's reader state) with a timeout.
pcscd notices a card change only at its 400 ms vpcd poll (test-stack.md §3),
so event waits allow a few seconds.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from smartcard import scard

from ccidbridge.card.pcsc import (
    NO_SW,
    NOT_ANSWERING,
    PcscCard,
    PcscUnavailable,
    atr_matches,
    hr_text,
    list_readers,
    reader_matches,
)
from ccidbridge.cli import main as cli_main
from ccidbridge.spec import CardProtocol as Protocol  # the lead renames the uses
from ccidbridge.spec import ReaderSpec, Share
from lab.pcsc import HostConnection, PcscStack, entry_name
from lab.vicc import VICC_ATR
from lab.vpcd_card import ATR_PRESETS, pattern

pytestmark = pytest.mark.stack

OK = scard.SCARD_S_SUCCESS
T0_T1 = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
DUAL, T1 = ATR_PRESETS["dual"], ATR_PRESETS["t1"]
WAIT = 5.0  # s: generous next to pcscd's 400 ms poll


# ------------------------------------------------------------------------------ helpers


class RecordingSink:
    """Collects every sink call as ``(kind, *args)`` with its time; waits with timeouts."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.times: list[float] = []
        self.closed = False
        self.after_close: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()

    def _add(self, *call: Any) -> None:
        with self._cond:
            if self.closed:
                self.after_close.append(call)
            self.calls.append(call)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def card_inserted(self, atr: bytes, reader: str) -> None:
        self._add("inserted", atr, reader)

    def card_removed(self, reason: str) -> None:
        self._add("removed", reason)

    def apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
        self._add("done", seq, response, error)

    def notice(self, message: str, level: int) -> None:
        self._add("notice", message, level)

    def mark(self) -> int:
        with self._cond:
            return len(self.calls)

    def of(self, kind: str, since: int = 0) -> list[tuple[Any, ...]]:
        with self._cond:
            return [c for c in self.calls[since:] if c[0] == kind]

    def notices(self, text: str) -> list[str]:
        return [c[1] for c in self.of("notice") if text in c[1]]

    def wait(
        self,
        kind: str,
        since: int = 0,
        pred: Callable[[tuple[Any, ...]], bool] = lambda c: True,
        timeout: float = WAIT,
    ) -> tuple[tuple[Any, ...], float]:
        """The first ``kind`` call at index >= ``since`` matching ``pred``, and its time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(since, len(self.calls)):
                    c = self.calls[i]
                    if c[0] == kind and pred(c):
                        return c, self.times[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {kind!r} call within {timeout} s; calls: {self.calls}"
                    )
                self._cond.wait(left)

    def quiet(self, kind: str, since: int, timeout: float) -> bool:
        """True if no ``kind`` call arrives within ``timeout`` (for 'must not happen')."""
        try:
            self.wait(kind, since, timeout=timeout)
        except AssertionError:
            return True
        return False


def send(card: PcscCard, sink: RecordingSink, seq: int, apdu: bytes | str) -> tuple[Any, ...]:
    """transmit() and wait for its apdu_done: ``("done", seq, response, error)``."""
    if isinstance(apdu, str):
        apdu = bytes.fromhex(apdu)
    mark = sink.mark()
    card.transmit(seq, apdu)
    return sink.wait("done", mark, lambda c: c[1] == seq)[0]


Bridge = Callable[..., tuple[PcscCard, RecordingSink]]


@pytest.fixture
def bridge(_pcsc_alive: PcscStack) -> Iterator[Bridge]:
    """Factory: a started PcscCard for ``ReaderSpec(**kw)`` and its sink; stopped at teardown."""
    made: list[tuple[PcscCard, RecordingSink]] = []

    def make(**kw: Any) -> tuple[PcscCard, RecordingSink]:
        card, sink = PcscCard(ReaderSpec(**kw)), RecordingSink()
        card.start(sink)
        made.append((card, sink))
        return card, sink

    try:
        yield make
    finally:
        for card, sink in made:
            t = time.monotonic()
            card.stop()
            sink.closed = True
            assert time.monotonic() - t < 1.5, "stop() did not return promptly"
        for _, sink in made:
            assert not sink.after_close, f"sink called after stop(): {sink.after_close}"
            # no APDU contents in anything we say (the PIN 1234 travels in VERIFY)
            assert not [m for m in sink.notices("") if "31323334" in m or "1234" in m]


# ------------------------------------------------------------------------------ pure parts


def test_atr_and_reader_matching() -> None:
    assert atr_matches(DUAL, None, None)
    assert atr_matches(DUAL, DUAL, None) and not atr_matches(DUAL, T1, None)
    masked = DUAL[:-3] + b"\x00\x00\x00"
    mask = b"\xff" * (len(DUAL) - 3) + b"\x00\x00\x00"
    assert atr_matches(DUAL, masked, mask) and not atr_matches(DUAL, masked, None)
    assert not atr_matches(DUAL[:-1], masked[:-1] + b"\x01", mask[:-1] + b"\xff")
    assert reader_matches(ReaderSpec(name="A 00 00"), "A 00 00")
    assert not reader_matches(ReaderSpec(name="A 00"), "A 00 00")
    assert reader_matches(ReaderSpec(match="Virtual PCD B *"), "Virtual PCD B 00 01")
    assert not reader_matches(ReaderSpec(match="Virtual PCD B *"), "Virtual PCD 00 01")
    assert reader_matches(ReaderSpec(), "anything")
    assert hr_text(0x80100016) == "SCARD_E_NOT_TRANSACTED (0x80100016)"


# ------------------------------------------------------------------------------ selection


def test_selection_by_name_glob_first_card_and_atr(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """Name, glob and 'first reader with a card' each pick the right card; atr= filters."""
    a = test_card("dual", reader="Virtual PCD 00 01", process=False)  # reader 00 00 stays empty
    b = test_card("t1", reader="Virtual PCD B 00 00", process=False)
    shared = {"share": Share.SHARED}  # several bridges on one card at once
    cases = [
        ({"name": b.reader}, b),
        ({"match": "Virtual PCD B *"}, b),
        ({}, a),  # first reader *with a card*: 00 00 is empty
        ({"atr": T1}, b),  # first with a card whose ATR matches
        ({"atr": DUAL[:-2] + b"\xaa\xbb", "atr_mask": b"\xff" * (len(DUAL) - 2) + b"\0\0"}, a),
    ]
    sinks = [(bridge(**spec, **shared)[1], want) for spec, want in cases]
    for sink, want in sinks:
        (_, atr, reader), _ = sink.wait("inserted")
        assert (reader, atr) == (want.reader, want.atr)
    # a named reader whose card has the wrong ATR: said once, not served
    _, sink = bridge(name=a.reader, atr=T1, **shared)
    sink.wait("notice", pred=lambda c: "does not match" in c[1])
    assert sink.quiet("inserted", 0, 1.2)  # > one fallback rescan (1 s)
    assert len(sink.notices("does not match")) == 1


def test_reader_missing_said_once_then_found(pcsc_stack: PcscStack, test_card, bridge: Bridge):  # noqa: ANN001, ANN201
    """A reader that is not there: one notice, no line per retry; found when it appears
    (after pcscd restarts with a new reader entry: vpcd readers only change that way)."""
    entries = pcsc_stack.n_entries
    want = f"{entry_name(entries)} 00 00"  # the next vpcd entry, e.g. "Virtual PCD C 00 00"
    assert want not in pcsc_stack.readers
    _, sink = bridge(name=want)
    sink.wait("notice", pred=lambda c: "not found" in c[1])
    assert sink.quiet("inserted", 0, 1.2)  # spans a fallback rescan
    pcsc_stack.ensure_slots(2 * (entries + 1))  # restarts pcscd with one more entry
    card = test_card("t1", reader=want, process=False)
    (_, atr, reader), _ = sink.wait("inserted")
    assert (reader, atr) == (want, card.atr)
    assert len(sink.notices("not found")) == 1
    assert sink.notices("pcscd is running again")


# ------------------------------------------------------------------------------ events


def test_insert_remove_reach_sink(test_card, bridge: Bridge, record_property) -> None:  # noqa: ANN001
    card = test_card("dual", process=False)
    _, sink = bridge(name=card.reader)
    sink.wait("inserted")
    lat = []
    for _ in range(2):
        mark = sink.mark()
        t = time.monotonic()
        card.remove()  # returns once pcscd's own state says EMPTY
        seen = time.monotonic()
        (_, reason), t_sink = sink.wait("removed", mark)
        assert reason == "card removed"
        lat.append(("remove", t_sink - seen, t_sink - t))
        mark = sink.mark()
        t = time.monotonic()
        card.insert()  # returns once PRESENT
        seen = time.monotonic()
        (_, atr, reader), t_sink = sink.wait("inserted", mark)
        assert (atr, reader) == (card.atr, card.reader)
        lat.append(("insert", t_sink - seen, t_sink - t))
    for kind, after_pcscd, total in lat:
        print(f"{kind}: sink {after_pcscd * 1e3:+.1f} ms vs lab's own wait, {total * 1e3:.0f} ms")
    record_property("event_latency_ms", [(k, round(a * 1e3, 1)) for k, a, _ in lat])
    # our monitor and the lab's waiter see pcscd's change at the same moment
    assert all(after < 0.1 for _, after, _ in lat)


def test_responses_equal_direct_pyscard(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """Shared mode, interleaved with a second host program: the same APDU gets the same answer."""
    card = test_card("dual", process=False)
    bc, sink = bridge(name=card.reader, share=Share.SHARED)
    sink.wait("inserted")
    apdus = [
        "00A4040007F0636369646272",  # SELECT by AID with FCI
        "00A4040C03A0A0A0",  # unknown AID: 6A82
        "801000000401020304",  # echo data
        "80126A8800",  # chosen SW with 256 data bytes
        "80101000" + "00",  # 4096-byte answer to a short APDU
        "80100000000400",  # extended Le
        "00EE0000",  # 6D00
        "FF000000",  # 6E00
    ]
    with HostConnection(card.reader) as other:
        assert other.hr == OK
        for seq, hexapdu in enumerate(apdus):
            apdu = bytes.fromhex(hexapdu)
            _, _, resp, err = send(bc, sink, seq, apdu)
            assert err is None
            assert resp == other.ok(apdu), hexapdu
    assert send(bc, sink, 99, "8010000800")[2] == pattern(8) + b"\x90\x00"


def test_exclusive_locks_out_other_programs_shared_does_not(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    card = test_card("dual", process=False)
    ex, sink = bridge(name=card.reader)  # share defaults to exclusive
    sink.wait("inserted")
    with HostConnection(card.reader) as other:
        assert other.hr == scard.SCARD_E_SHARING_VIOLATION
    assert send(ex, sink, 1, "0084000004")[3] is None
    ex.stop()  # releases the card (LEAVE_CARD) ...
    with HostConnection(card.reader) as other:
        assert other.hr == OK  # ... so the other program gets it now
    sh, sink2 = bridge(name=card.reader, share=Share.SHARED)
    sink2.wait("inserted")
    with HostConnection(card.reader) as other:
        assert other.hr == OK
        assert other.ok(bytes.fromhex("801000000101")) == b"\x01\x90\x00"
        assert send(sh, sink2, 2, "801000000102")[2] == b"\x02\x90\x00"


def test_busy_card_said_once_then_served(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """Another program holds the card exclusively: one notice, served once it lets go."""
    card = test_card("dual", process=False)
    other = HostConnection(card.reader, scard.SCARD_SHARE_EXCLUSIVE)
    try:
        assert other.hr == OK
        _, sink = bridge(name=card.reader)
        sink.wait("notice", pred=lambda c: "in use by another program" in c[1])
        assert sink.quiet("inserted", 0, 1.5)  # spans retries at the 1 s backoff cap
    finally:
        other.close()
    t = time.monotonic()
    _, t_sink = sink.wait("inserted")
    print(f"served {(t_sink - t) * 1e3:.1f} ms after the other program let go")
    assert t_sink - t < 1.2
    assert len(sink.notices("in use by another program")) == 1


def test_leave_card_on_stop_keeps_card_state(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """stop() disconnects with SCARD_LEAVE_CARD: a PIN verified via the bridge stays verified."""
    card = test_card("dual", process=False)
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    assert send(bc, sink, 1, "002000000431323334")[2] == b"\x90\x00"
    t = time.perf_counter()
    bc.stop()
    print(f"stop() took {(time.perf_counter() - t) * 1e3:.1f} ms")
    with HostConnection(card.reader) as other:
        assert other.ok(bytes.fromhex("0020000000")) == b"\x90\x00"  # still verified


def test_reset_by_other_program(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """Shared mode: another program resets the card; our next exchange sees
    SCARD_W_RESET_CARD, we reconnect (LEAVE_CARD) and report the card again."""
    card = test_card("dual", process=False)
    bc, sink = bridge(name=card.reader, share=Share.SHARED)
    sink.wait("inserted")
    assert send(bc, sink, 1, "002000000431323334")[2] == b"\x90\x00"
    with HostConnection(card.reader) as other:
        hr, _ = scard.SCardReconnect(
            other.h, scard.SCARD_SHARE_SHARED, T0_T1, scard.SCARD_RESET_CARD
        )
        assert hr == OK
    mark = sink.mark()
    _, _, resp, err = send(bc, sink, 2, "0020000000")
    assert resp is None and err == "SCARD_W_RESET_CARD (0x80100068)"
    (_, atr, reader), _ = sink.wait("inserted", mark)
    assert (atr, reader) == (card.atr, card.reader)
    assert not sink.of("removed")
    # the card was really reset (PIN no longer verified) and is served again
    assert send(bc, sink, 3, "0020000000")[2] == b"\x63\xc3"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_pcscd_restart_recovers(pcsc_stack: PcscStack, test_card, bridge: Bridge, sig) -> None:  # noqa: ANN001
    """pcscd stopped (or crashed) and started again, the card re-inserted: served again."""
    card = test_card("dual", process=False)
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    mark = sink.mark()
    t = time.monotonic()
    pcsc_stack.restart(reinsert=True, sig=sig)  # every old context is dead for good (notes §1)
    (_, reason), _ = sink.wait("removed", mark)
    assert reason == "pcscd stopped"
    (_, atr, reader), t_back = sink.wait("inserted", mark)
    assert (atr, reader) == (card.atr, card.reader)
    print(f"card served again {(t_back - t) * 1e3:.0f} ms after the restart began")
    assert len(sink.notices("pcscd is not running; waiting")) == 1
    assert len(sink.notices("pcscd is running again")) == 1
    assert send(bc, sink, 1, "8010000800")[2] == pattern(8) + b"\x90\x00"


def test_pcscd_down_at_start_then_up(pcsc_stack: PcscStack, test_card, bridge: Bridge) -> None:  # noqa: ANN001
    card = test_card("dual", process=False)
    pcsc_stack.stop()
    try:
        _, sink = bridge(name=card.reader)
        sink.wait("notice", pred=lambda c: c[1] == "pcscd is not running; waiting")
        assert sink.quiet("notice", 1, 1.2)  # backoff retries are silent
    finally:
        pcsc_stack.start()
        card.restart()
    sink.wait("inserted")
    assert len(sink.notices("pcscd is not running")) == 1


# ------------------------------------------------------------------------------ faults


def test_crash_mid_apdu(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """rv=0 with an empty answer (gotcha 11): error for the APDU, then card_removed;
    served again once a working card is present."""
    card = test_card("dual", ["crash=B0"])
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    mark = sink.mark()
    _, _, resp, err = send(bc, sink, 1, "00B0000004")
    assert (resp, err) == (None, NO_SW)
    (_, reason), _ = sink.wait("removed", mark)
    assert reason == "card failed"
    i_done = next(i for i, c in enumerate(sink.calls) if c[:2] == ("done", 1))
    i_removed = next(i for i, c in enumerate(sink.calls) if c[0] == "removed")
    assert i_done < i_removed
    assert send(bc, sink, 2, "0084000008")[3] is not None  # no card: failed at once
    card.restart()
    sink.wait("inserted", mark)
    assert send(bc, sink, 3, "8010000800")[2] == pattern(8) + b"\x90\x00"


def test_removed_card_error_then_card_removed(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """An APDU that meets SCARD_W_REMOVED_CARD: its error first, then card_removed.

    Our monitor normally reports the removal first (it sees pcscd's EMPTY as soon as
    anybody), so it is muted here to let the worker meet the stale handle.
    """
    card = test_card("dual", process=False)
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    monitor = bc._monitor
    assert monitor is not None
    evaluate = monitor._evaluate
    monitor._evaluate = lambda *a: None  # type: ignore[method-assign]
    card.remove()  # pcscd says EMPTY
    mark = sink.mark()
    _, _, resp, err = send(bc, sink, 1, "8010000800")
    assert (resp, err) == (None, "SCARD_W_REMOVED_CARD (0x80100069)")
    (_, reason), _ = sink.wait("removed", mark)
    assert reason == "card removed"
    assert sink.calls.index(("removed", reason)) > sink.calls.index(("done", 1, None, err))
    monitor._evaluate = evaluate  # type: ignore[method-assign]
    card.insert()
    sink.wait("inserted", mark)
    assert send(bc, sink, 2, "8010000800")[2] == pattern(8) + b"\x90\x00"
    assert len(sink.of("inserted", mark)) == 1  # no flapping
    assert not sink.notices("cannot connect")


def test_hung_card_recheck_and_back(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """SIGSTOP: the transmit blocks for good.  recheck() fails queued APDUs at once and
    new ones immediately; after SIGCONT the late answer arrives and the card is back."""
    card = test_card("dual")
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    assert send(bc, sink, 1, "8010000800")[3] is None
    card.sigstop()
    try:
        mark = sink.mark()
        bc.transmit(2, bytes.fromhex("8010000800"))  # stuck in SCardTransmit
        bc.transmit(3, bytes.fromhex("8010000800"))  # queued behind it
        assert sink.quiet("done", mark, 0.3)
        t = time.monotonic()
        bc.recheck()  # what the runtime does after its APDU timeout
        (_, _, resp, err), t3 = sink.wait("done", mark, lambda c: c[1] == 3, timeout=1)
        assert (resp, err) == (None, NOT_ANSWERING) and t3 - t < 0.1
        t = time.monotonic()
        bc.transmit(4, b"\x80\x10\x00\x00\x08")
        (_, _, resp, err), t4 = sink.wait("done", mark, lambda c: c[1] == 4, timeout=1)
        assert (resp, err) == (None, NOT_ANSWERING) and t4 - t < 0.1
    finally:
        card.sigcont()
    (_, _, resp, err), _ = sink.wait("done", mark, lambda c: c[1] == 2)  # late, harmless
    assert err is None and resp is not None
    (_, atr, _), _ = sink.wait("inserted", mark)
    assert atr == card.atr
    assert not sink.of("removed", mark)  # the runtime already said it was gone
    assert send(bc, sink, 5, "8010000800")[2] == pattern(8) + b"\x90\x00"


def test_recheck_resets_a_card_that_ended_in_an_error(
    test_card,  # noqa: ANN001
    bridge: Bridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung exchange that finally fails (a mute card; a real reader's own timeout):
    the probe resets the card and serves it again.  SCardTransmit is wrapped to hang
    on INS EE and then fail, which vpcd cannot do by itself."""
    card = test_card("dual", process=False)
    entered, release = threading.Event(), threading.Event()
    real = scard.SCardTransmit

    def transmit(h: int, proto: int, apdu: list[int]) -> list[Any]:
        if apdu[1] == 0xEE:
            entered.set()
            assert release.wait(WAIT)
            return [scard.SCARD_E_NOT_TRANSACTED, []]
        return real(h, proto, apdu)

    monkeypatch.setattr(scard, "SCardTransmit", transmit)
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    assert send(bc, sink, 1, "002000000431323334")[2] == b"\x90\x00"
    mark = sink.mark()
    bc.transmit(2, bytes.fromhex("00EE0000"))
    assert entered.wait(WAIT)  # the worker is "stuck" in it
    bc.recheck()
    release.set()
    (_, _, resp, err), _ = sink.wait("done", mark, lambda c: c[1] == 2)
    assert (resp, err) == (None, "SCARD_E_NOT_TRANSACTED (0x80100016)")
    (_, atr, _), _ = sink.wait("inserted", mark)
    assert atr == card.atr and not sink.of("removed")
    assert send(bc, sink, 3, "0020000000")[2] == b"\x63\xc3"  # reset: PIN not verified


def test_refusals_do_not_deadlock_with_a_locking_sink(test_card) -> None:  # noqa: ANN001
    """The runtime calls transmit() holding its lock, and its apdu_done on our worker's
    thread takes that same lock.  A refusal (card not answering) must not wait for the
    worker's sink call in progress."""
    card = test_card("dual")
    runtime_lock = threading.RLock()
    entered = threading.Event()

    class LockingSink(RecordingSink):
        def apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
            if threading.current_thread().name == "ccidbridge-pcsc-card" and seq == 2:
                entered.set()
            with runtime_lock:
                super().apdu_done(seq, response, error)

    bc, sink = PcscCard(ReaderSpec(name=card.reader)), LockingSink()
    bc.start(sink)
    try:
        sink.wait("inserted")
        card.sigstop()
        bc.transmit(2, bytes.fromhex("8010000800"))  # stuck
        assert sink.quiet("done", 0, 0.2)
        bc.recheck()
        holding, finished = threading.Event(), threading.Event()

        def runtime() -> None:  # the runtime's _flush(): transmit() under its lock
            with runtime_lock:
                holding.set()
                if entered.wait(WAIT):  # the worker's late answer waits for our lock
                    bc.transmit(3, b"\x80\x10\x00\x00\x08")  # refused at once
                    finished.set()

        threading.Thread(target=runtime, daemon=True).start()
        assert holding.wait(WAIT)
        card.sigcont()
        assert finished.wait(2.0), "transmit() blocked: deadlock with the worker"
        sink.wait("done", 0, lambda c: c[1] == 2)
        sink.wait("inserted", 1)
    finally:
        card.sigcont()
        bc.stop()  # bounded even if deadlocked (the emitter's close() times out)


def test_stop_returns_with_worker_stuck(test_card) -> None:  # noqa: ANN001
    card = test_card("dual")
    bc, sink = PcscCard(ReaderSpec(name=card.reader)), RecordingSink()
    bc.start(sink)
    sink.wait("inserted")
    card.sigstop()
    try:
        bc.transmit(1, bytes.fromhex("8010000800"))
        assert sink.quiet("done", 0, 0.2)
        t = time.monotonic()
        bc.stop()
        sink.closed = True
        assert time.monotonic() - t < 1.0
    finally:
        card.sigcont()
    # the abandoned worker finishes its transmit, tells nobody, and lets the card go
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and bc._worker and bc._worker.thread.is_alive():
        bc._worker.thread.join(0.05)
    assert not sink.after_close
    with HostConnection(card.reader, scard.SCARD_SHARE_EXCLUSIVE) as other:
        assert other.hr == OK  # released


def test_protocol_t0_on_t1_only_card_said_once(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    card = test_card("t1", process=False)
    _, sink = bridge(name=card.reader, protocol=Protocol.T0)
    sink.wait("notice", pred=lambda c: "does not speak protocol=T0" in c[1])
    assert sink.quiet("inserted", 0, 1.2)
    assert len(sink.notices("protocol=T0")) == 1


def test_vicc_smoke(vicc_card, bridge: Bridge) -> None:  # noqa: ANN001
    """Debian's vicc (a real emulator, T=1 only ATR) through the card side."""
    bc, sink = bridge(name=vicc_card.reader)
    (_, atr, _), _ = sink.wait("inserted")
    assert atr == VICC_ATR
    assert send(bc, sink, 1, "00A4000C023F00")[2] == b"\x90\x00"
    resp = send(bc, sink, 2, "0084000008")[2]
    assert len(resp) == 10 and resp[-2:] == b"\x90\x00"


# ------------------------------------------------------------------------------ numbers


def _time_direct(reader: str, apdu: bytes, n: int, *, transaction: bool) -> list[float]:
    """A plain SCardTransmit loop (optionally inside Begin/EndTransaction, like shared mode)."""
    out = []
    share = scard.SCARD_SHARE_SHARED if transaction else scard.SCARD_SHARE_EXCLUSIVE
    with HostConnection(reader, share) as d:
        for i in range(n + 100):
            t = time.perf_counter()
            if transaction:
                scard.SCardBeginTransaction(d.h)
            d.ok(apdu)
            if transaction:
                scard.SCardEndTransaction(d.h, scard.SCARD_LEAVE_CARD)
            if i >= 100:
                out.append(time.perf_counter() - t)
    return out


def _time_bridge(reader: str, apdu: bytes, n: int, share: Share) -> list[float]:
    """transmit() -> apdu_done round trips, through a sink that only sets an Event."""
    done = threading.Event()

    class FastSink:
        def apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
            done.set()

        def card_inserted(self, atr: bytes, reader: str) -> None:
            done.set()

        def card_removed(self, reason: str) -> None:
            pass

        def notice(self, message: str, level: int) -> None:
            pass

    bc = PcscCard(ReaderSpec(name=reader, share=share))
    bc.start(FastSink())  # type: ignore[arg-type]
    out = []
    try:
        assert done.wait(WAIT)
        for seq in range(n + 100):
            done.clear()
            t = time.perf_counter()
            bc.transmit(seq, apdu)
            assert done.wait(WAIT)
            if seq >= 100:
                out.append(time.perf_counter() - t)
    finally:
        bc.stop()
    return out


def test_transmit_overhead(test_card, record_property) -> None:  # noqa: ANN001
    """Round trip transmit() -> apdu_done vs a direct SCardTransmit, same card, same run."""
    card = test_card("dual", process=False)
    n, apdu = 1000, bytes.fromhex("8010000800")
    runs = {
        "direct exclusive": _time_direct(card.reader, apdu, n, transaction=False),
        "bridge exclusive": _time_bridge(card.reader, apdu, n, Share.EXCLUSIVE),
        "direct transaction": _time_direct(card.reader, apdu, n, transaction=True),
        "bridge shared": _time_bridge(card.reader, apdu, n, Share.SHARED),
    }

    def us(xs: list[float], p: float) -> float:
        return sorted(xs)[int(p * (len(xs) - 1))] * 1e6

    for name, xs in runs.items():
        print(f"{name}: median {us(xs, 0.5):.0f} us, p90 {us(xs, 0.9):.0f}, p99 {us(xs, 0.99):.0f}")
        record_property(name.replace(" ", "_") + "_median_us", round(us(xs, 0.5)))
    for mode, direct in (("exclusive", "direct exclusive"), ("shared", "direct transaction")):
        overhead = us(runs[f"bridge {mode}"], 0.5) - us(runs[direct], 0.5)
        print(f"overhead {mode}: {overhead:.0f} us per APDU (median)")
        assert overhead < 1000


# ------------------------------------------------------------------------------ `readers`


def test_list_readers_and_command(test_card, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    card = test_card("t1", process=False)
    infos = {i.name: i for i in list_readers()}
    assert infos[card.reader].card_present and infos[card.reader].atr == T1
    assert cli_main(["readers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{card.reader}: card present, ATR {T1.hex(' ').upper()}" in lines
    assert len(lines) == len(infos)
    for name, info in infos.items():
        if not info.card_present:
            assert f"{name}: no card" in lines
    assert cli_main(["readers", "--json"]) == 0
    data = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert data[card.reader] == {"name": card.reader, "card_present": True, "atr": T1.hex().upper()}


def test_readers_command_without_pcscd(pcsc_stack: PcscStack, _pcsc_alive: PcscStack) -> None:
    pcsc_stack.stop()
    try:
        with pytest.raises(PcscUnavailable, match=r"^pcscd is not running \(SCARD_E_NO_SERVICE\)$"):
            list_readers()
        proc = subprocess.run(
            [sys.executable, "-m", "ccidbridge", "readers"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        pcsc_stack.start()
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == "ccidbridge: pcscd is not running (SCARD_E_NO_SERVICE)\n"


def test_notice_levels_are_logging_levels(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    _, sink = bridge(name="no such reader")
    (_, message, level), _ = sink.wait("notice")
    assert message == "reader 'no such reader' not found; waiting"
    assert level == logging.WARNING
