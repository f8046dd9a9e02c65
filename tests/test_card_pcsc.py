"""The PC/SC card side against the real stack: pcscd + vpcd + our test card (and vicc).

The card side is driven as the bridge's APDU thread drives it
(tests/cardharness.py).  Every wait is on real state (its reports, pcscd's
reader state) with a timeout; pcscd notices a card change only at its 400 ms
vpcd poll (docs/lab.md#V3), so event waits allow a few seconds.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from smartcard import scard

from ccidbridge.card.listing import PcscUnavailable
from ccidbridge.card.listing import reader_infos as list_readers
from ccidbridge.card.pcsc import NO_CARD, NO_SW, PcscCard
from ccidbridge.cli import main as cli_main
from ccidbridge.spec import CardProtocol, ReaderSpec, Share
from lab.pcsc import HostConnection, PcscStack, entry_name
from lab.vicc import VICC_ATR
from lab.vpcd_card import ATR_PRESETS, pattern
from tests.cardharness import WAIT, DrivenCard, Record

pytestmark = pytest.mark.stack

OK = scard.SCARD_S_SUCCESS
T0_T1 = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
DUAL, T1 = ATR_PRESETS["dual"], ATR_PRESETS["t1"]


# ------------------------------------------------------------------------------ helpers


def send(card: DrivenCard, sink: Record, seq: int, apdu: bytes | str) -> tuple[Any, ...]:
    """transmit() on the owner thread and its answer: ``("done", seq, response, error)``."""
    return card.send(seq, apdu)


Bridge = Callable[..., tuple[DrivenCard, Record]]


@pytest.fixture
def bridge(_pcsc_alive: PcscStack) -> Iterator[Bridge]:
    """Factory: a PcscCard for ``ReaderSpec(**kw)`` driven as the bridge drives it,
    and the record of what it said; stopped at teardown."""
    made: list[DrivenCard] = []

    def make(**kw: Any) -> tuple[DrivenCard, Record]:
        driven = DrivenCard(lambda log: PcscCard(ReaderSpec(**kw), log))
        made.append(driven)
        return driven, driven.record

    try:
        yield make
    finally:
        for driven in made:
            driven.stop()
            # no APDU contents in anything the card side says (PIN 1234 travels in VERIFY)
            said = driven.record.notices("")
            assert not [m for m in said if "31323334" in m or "1234" in m]


# ------------------------------------------------------------------------------ pure parts


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
        (_, atr, reader) = sink.wait("inserted")
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
    (_, atr, reader) = sink.wait("inserted")
    assert (reader, atr) == (want, card.atr)
    assert len(sink.notices("not found")) == 1
    assert sink.notices("pcscd is running again")


# ------------------------------------------------------------------------------ events


def test_insert_remove_reach_the_owner(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """How fast: benchmarks (events); here what and in which order."""
    card = test_card("dual", process=False)
    _, sink = bridge(name=card.reader)
    sink.wait("inserted")
    for _ in range(2):
        mark = sink.mark()
        card.remove()  # returns once pcscd's own state says EMPTY
        (_, reason) = sink.wait("removed", mark)
        assert reason == "card removed"
        mark = sink.mark()
        card.insert()  # returns once PRESENT
        (_, atr, reader) = sink.wait("inserted", mark)
        assert (atr, reader) == (card.atr, card.reader)
    kinds = [c[0] for c in sink.calls if c[0] in ("inserted", "removed")]
    assert kinds == ["inserted", "removed", "inserted", "removed", "inserted"]


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
    sink.wait("inserted")  # at the next retry (backoff capped at 1 s)
    assert len(sink.notices("in use by another program")) == 1


def test_leave_card_on_stop_keeps_card_state(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """stop() disconnects with SCARD_LEAVE_CARD: a PIN verified via the bridge stays verified."""
    card = test_card("dual", process=False)
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    assert send(bc, sink, 1, "002000000431323334")[2] == b"\x90\x00"
    bc.stop()
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
    (_, atr, reader) = sink.wait("inserted", mark)
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
    pcsc_stack.restart(reinsert=True, sig=sig)  # old contexts die (docs/pcsc-lite.md#P1)
    (_, reason) = sink.wait("removed", mark)
    assert reason == "pcscd stopped"
    (_, atr, reader) = sink.wait("inserted", mark)
    assert (atr, reader) == (card.atr, card.reader)
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
    """rv=0 with an empty answer (docs/pcsc-lite.md#P5): the APDU fails, then Removed;
    served again once a working card is present."""
    card = test_card("dual", ["crash=B0"])
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    mark = sink.mark()
    _, _, resp, err = send(bc, sink, 1, "00B0000004")
    assert (resp, err) == (None, NO_SW)
    (_, reason) = sink.wait("removed", mark)
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
    monitor = bc.card._monitor  # type: ignore[attr-defined]
    assert monitor is not None
    evaluate = monitor.choice.evaluate
    monitor.choice.evaluate = lambda *a: []  # type: ignore[method-assign]
    card.remove()  # pcscd says EMPTY
    mark = sink.mark()
    _, _, resp, err = send(bc, sink, 1, "8010000800")
    assert (resp, err) == (None, "SCARD_W_REMOVED_CARD (0x80100069)")
    (_, reason) = sink.wait("removed", mark)
    assert reason == "card removed"
    assert sink.calls.index(("removed", reason)) > sink.calls.index(("done", 1, None, err))
    monitor.choice.evaluate = evaluate  # type: ignore[method-assign]
    card.insert()
    sink.wait("inserted", mark)
    assert send(bc, sink, 2, "8010000800")[2] == pattern(8) + b"\x90\x00"
    assert len(sink.of("inserted", mark)) == 1  # no flapping
    assert not sink.notices("cannot connect")


def test_hung_card_revived_after_its_late_answer(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    """SIGSTOP: the transmit blocks for good (the bridge's watchdog then serves the
    guest from another thread).  After SIGCONT the late answer comes back, and
    revive(failed=False) reports the card again without resetting it."""
    card = test_card("dual")
    bc, sink = bridge(name=card.reader)
    sink.wait("inserted")
    assert send(bc, sink, 1, "002000000431323334")[2] == b"\x90\x00"
    card.sigstop()
    try:
        mark = sink.mark()
        bc.transmit(2, "8010000800")  # stuck in SCardTransmit
        assert sink.quiet("done", mark, 0.3)
    finally:
        card.sigcont()
    (_, _, resp, err) = sink.wait("done", mark, lambda c: c[1] == 2)  # late
    assert err is None and resp == pattern(8) + b"\x90\x00"
    bc.revive(False)
    (_, atr, _) = sink.wait("inserted", mark)
    assert atr == card.atr and not sink.of("removed", mark)
    assert send(bc, sink, 3, "0020000000")[2] == b"\x90\x00"  # not reset: still verified


def test_revive_resets_a_card_that_ended_in_an_error(
    test_card,  # noqa: ANN001
    bridge: Bridge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung exchange that finally fails (a mute card; a real reader's own timeout):
    revive(failed=True) resets the card and serves it again.  SCardTransmit is
    wrapped to hang on INS EE and then fail, which vpcd cannot do by itself."""
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
    bc.transmit(2, "00EE0000")
    assert entered.wait(WAIT)  # the owner is "stuck" in it
    release.set()
    (_, _, resp, err) = sink.wait("done", mark, lambda c: c[1] == 2)
    assert (resp, err) == (None, "SCARD_E_NOT_TRANSACTED (0x80100016)")
    bc.revive(True)
    (_, atr, _) = sink.wait("inserted", mark)
    assert atr == card.atr and not sink.of("removed")
    assert send(bc, sink, 3, "0020000000")[2] == b"\x63\xc3"  # reset: PIN not verified


def test_no_card_fails_at_once(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    bc, sink = bridge(name="no such reader")
    sink.wait("notice", pred=lambda c: "not found" in c[1])
    assert send(bc, sink, 1, "0084000008")[2:] == (None, NO_CARD)


def test_protocol_t0_on_t1_only_card_said_once(test_card, bridge: Bridge) -> None:  # noqa: ANN001
    card = test_card("t1", process=False)
    _, sink = bridge(name=card.reader, protocol=CardProtocol.T0)
    sink.wait("notice", pred=lambda c: "does not speak protocol=T0" in c[1])
    assert sink.quiet("inserted", 0, 1.2)
    assert len(sink.notices("protocol=T0")) == 1


def test_vicc_smoke(vicc_card, bridge: Bridge) -> None:  # noqa: ANN001
    """Debian's vicc (a real emulator, T=1 only ATR) through the card side."""
    bc, sink = bridge(name=vicc_card.reader)
    (_, atr, _) = sink.wait("inserted")
    assert atr == VICC_ATR
    assert send(bc, sink, 1, "00A4000C023F00")[2] == b"\x90\x00"
    resp = send(bc, sink, 2, "0084000008")[2]
    assert len(resp) == 10 and resp[-2:] == b"\x90\x00"


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
    (_, message, level) = sink.wait("notice")
    assert message == "reader 'no such reader' not found; waiting"
    assert level == logging.WARNING
