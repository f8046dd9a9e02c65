"""The whole bridge on real components: pcscd + vpcd cards (ours and Debian's
vicc) behind it, the QEMU twin peer or real QEMU 7.2 in front of it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from smartcard import scard

from ccidbridge.card.pcsc import PcscCard
from ccidbridge.protocol.atr import announce_t0
from ccidbridge.spec import ReaderSpec, Share
from lab.bridgeproc import write_config
from lab.device_peer import DevicePeer
from lab.pcsc import PcscStack, direct_transmit
from lab.twin import Outcome
from lab.vpcd_card import ATR_PRESETS
from tests.bridgeharness import RunningBridge, served_card

pytestmark = pytest.mark.stack

SELECT_FILE = bytes.fromhex("00A4020C020101")
APDUS = [
    bytes.fromhex("00A4040C07A0000000030000"),  # SELECT by AID
    SELECT_FILE,
    bytes.fromhex("00B0000010"),  # READ BINARY 16
    bytes.fromhex("0084000008"),  # GET CHALLENGE (deterministic on our card)
    bytes.fromhex("8010000000"),  # ECHO, no data
    bytes.fromhex("80100000020102FF"),
    bytes.fromhex("8012698200"),  # chosen status word 6982
    bytes.fromhex("00EE000000"),  # unknown INS
]


def bridge_to_peer(
    peer: DevicePeer, reader: str, share: Share = Share.EXCLUSIVE, trace: int = 0, **kw
) -> RunningBridge:
    spec = ReaderSpec(name=reader, share=share, **kw)
    return RunningBridge(served_card(peer.endpoint, spec), PcscCard(spec), trace=trace)


#: The production path is the tested path: APDU tracing off (the default) and on.
traced = pytest.mark.parametrize("trace", [0, 2], ids=["trace-off", "trace-vv"])


@traced
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_every_response_equals_a_direct_transmit(test_card, tmp_path, kind, trace) -> None:
    card = test_card("dual")
    expected = direct_transmit(card.reader, APDUS)
    card.restart()  # same deterministic card state for the bridged run
    with (
        DevicePeer(kind, path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader, trace=trace),
    ):
        peer.wait_card(True)
        got = [peer.guest(apdu).data for apdu in APDUS]
    assert got == expected


def test_vicc_smoke_atr_rewritten_and_apdus_relayed(vicc_card, tmp_path) -> None:
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, vicc_card.reader) as bridge,
    ):
        peer.wait_card(True)
        vicc_atr = ATR_PRESETS["vicc"]
        assert peer.device.atr == announce_t0(vicc_atr) != vicc_atr
        bridge.wait_log("rewrite-atr='no'")
        answer = peer.guest(bytes.fromhex("0084000008"))
        assert answer.outcome is Outcome.RESPONSE
        assert len(answer.data) == 10 and answer.data[-2:] == b"\x90\x00"
        assert peer.guest(bytes.fromhex("00A4000C023F00")).data == b"\x90\x00"


@traced
def test_removal_and_insertion_reach_the_peer(test_card, tmp_path, trace) -> None:
    card = test_card("dual")
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader, trace=trace),
    ):
        peer.wait_card(True)
        card.remove()
        peer.wait_card(False, timeout=3)
        card.insert()
        peer.wait_card(True, timeout=3)
        assert peer.guest(SELECT_FILE).data == b"\x90\x00"


def test_exclusive_locks_out_other_host_programs_and_shared_does_not(test_card, tmp_path) -> None:
    card = test_card("dual")

    def other_program_connect() -> int:
        hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        hr, handle, _ = scard.SCardConnect(
            ctx,
            card.reader,
            scard.SCARD_SHARE_SHARED,
            scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
        )
        if hr == 0:
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)
        return hr

    for share, expected in ((Share.EXCLUSIVE, scard.SCARD_E_SHARING_VIOLATION), (Share.SHARED, 0)):
        with (
            DevicePeer("unix", path=str(tmp_path / f"{share.value}.sock")) as peer,
            bridge_to_peer(peer, card.reader, share),
        ):
            peer.wait_card(True)
            assert peer.guest(SELECT_FILE).data == b"\x90\x00"
            assert other_program_connect() == expected
            assert peer.guest(SELECT_FILE).data == b"\x90\x00"


def test_long_response_reaches_the_guest_through_get_response(test_card, tmp_path) -> None:
    card = test_card("dual")
    command = bytes.fromhex("80100000" + "0003E8")  # ECHO with extended Le 1000
    (expected,) = direct_transmit(card.reader, [command])
    assert len(expected) == 1002
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader),
    ):
        peer.wait_card(True)
        answer = peer.guest(command)
        data, sw = answer.data[:-2], answer.data[-2:]
        while sw[0] == 0x61:
            answer = peer.guest(b"\x00\xc0\x00\x00" + sw[1:])
            assert len(answer.data) <= 374
            data, sw = data + answer.data[:-2], answer.data[-2:]
    assert data + sw == expected
    assert not any(a.outcome is Outcome.DROPPED for a in peer.device.answers)


@traced
def test_crash_mid_apdu_fails_it_at_once_then_removes_the_card(test_card, tmp_path, trace) -> None:
    card = test_card("dual", ["crash=B0"])
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader, trace=trace),
    ):
        peer.wait_card(True)
        answer = peer.guest(bytes.fromhex("00B0000010"))
        assert answer.outcome is Outcome.FAILED  # VSC_Error, not a guest-side timeout
        peer.wait_card(False, timeout=3)


@traced
def test_hung_card_times_out_then_comes_back(test_card, tmp_path, trace) -> None:
    card = test_card("dual")
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader, apdu_timeout=0.5, trace=trace) as bridge,
    ):
        peer.wait_card(True)
        card.sigstop()
        try:
            answer = peer.guest(SELECT_FILE, timeout=5)
            assert answer.outcome is Outcome.FAILED
            peer.wait_card(False, timeout=2)  # CardRemove sent and acked: the socket is served
            bridge.wait_log("did not answer within")
            assert peer.guest(SELECT_FILE).outcome is Outcome.NO_CARD
        finally:
            card.sigcont()
        peer.wait_card(True, timeout=5)
        assert peer.guest(SELECT_FILE).data == b"\x90\x00"
        bridge.wait_log("answered again after its timeout")


@traced
def test_hung_card_pulled_and_a_card_inserted_is_served(test_card, tmp_path, trace) -> None:
    """A removal and a new card while the bridge has given up on a hung card
    (the old runtime could queue the detach behind the attach) end with the
    new card served."""
    card = test_card("dual")
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader, apdu_timeout=0.5, trace=trace) as bridge,
    ):
        peer.wait_card(True)
        card.sigstop()
        assert peer.guest(SELECT_FILE, timeout=5).outcome is Outcome.FAILED
        peer.wait_card(False, timeout=2)
        card.kill()  # pulled while hung: pcscd fails the stuck exchange
        card.insert()
        peer.wait_card(True, timeout=10)
        assert peer.guest(SELECT_FILE).data == b"\x90\x00"
        assert "Traceback" not in bridge.text()


@traced
def test_pcscd_restart_is_recovered_and_the_atr_sent_again(
    pcsc_stack, test_card, tmp_path, trace
) -> None:
    card = test_card("dual")
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge_to_peer(peer, card.reader, trace=trace),
    ):
        peer.wait_card(True)
        atrs_before = sum(1 for f in peer.device.received if f[0] == 5)
        pcsc_stack.restart(reinsert=True)
        peer.wait(
            lambda d: d.card_present and sum(1 for f in d.received if f[0] == 5) > atrs_before,
            timeout=10,
            what="the ATR again after pcscd's restart",
        )
        assert peer.guest(SELECT_FILE).data == b"\x90\x00"


def test_run_command_serves_a_config_and_says_goodbye_on_sigterm(test_card, tmp_path) -> None:
    card = test_card("dual")
    sock = tmp_path / "q.sock"
    config = write_config(tmp_path / "vm.xml", sock, card.reader, timeout="5")
    with DevicePeer("unix", path=str(sock)) as peer:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccidbridge", "run", "-vv", str(config)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            peer.wait_card(True, timeout=10)
            verify = bytes.fromhex("002000800431323334")
            assert peer.guest(verify).data == b"\x90\x00"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        peer.wait_card(False, timeout=2)
        types = [f[0] for f in peer.device.received]
        assert types[-2:] == [6, 4], types  # CardRemove, then ReaderRemove
    assert "Traceback" not in err
    assert "31323334" not in err and "data redacted" in err
    assert "APDU CLA 00 INS 20" in err


def test_bad_config_is_one_line_exit_2(tmp_path) -> None:
    config = tmp_path / "bad.xml"
    config.write_text("<ccidbridge>\n  <smartcard mode='bogus'/>\n</ccidbridge>\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ccidbridge", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{config}:2:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_card_in_the_sixteenth_reader_is_served(pcsc_stack, tmp_path) -> None:
    """pcsc-lite watches at most 16 readers per SCardGetStatusChange, the PnP
    pseudo reader included; with 16 readers a naive monitor never sees a card.
    (16 is also pcscd's most readers, so this runs on a stack of its own.)"""
    pcsc_stack.stop()
    try:
        with PcscStack(8, workdir=tmp_path / "pcsc16") as big:
            last, fifteenth = big.readers[15], big.readers[14]
            card = big.insert_card("dual", reader=last)
            other = big.insert_card("dual", reader=fifteenth)
            try:
                for name, spec in ((last, ReaderSpec(name=last)), (fifteenth, ReaderSpec())):
                    sock = tmp_path / f"{big.readers.index(name)}.sock"
                    with (
                        DevicePeer("unix", path=str(sock)) as peer,
                        RunningBridge(served_card(peer.endpoint, spec), PcscCard(spec)),
                    ):
                        peer.wait_card(True, timeout=5)
                        assert peer.guest(SELECT_FILE).data == b"\x90\x00"
            finally:
                card.close()
                other.close()
    finally:
        pcsc_stack.start()
