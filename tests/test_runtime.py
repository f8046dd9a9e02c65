"""The runtime over real sockets: against the QEMU-twin peer and real QEMU 7.2.

The card here is the instant card (no pcscd); test_bridge_pcsc.py puts real
pcscd + vpcd cards behind the bridge.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time

import pytest

from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.messages import (
    Apdu,
    Atr,
    Error,
    ReaderAdd,
    ReaderRemove,
    decode,
    encode,
    frame,
)
from ccidbridge.protocol.wire import MsgType
from ccidbridge.runtime.bridge import OUT_HIGH_WATER
from ccidbridge.runtime.transport import READ_SIZE, TransportError
from ccidbridge.spec import Endpoint
from lab.device_peer import DevicePeer
from lab.instant_card import DEFAULT_ATR, InstantCard
from lab.qemu import QemuPassthru, TcpEndpoint, UnixEndpoint, free_tcp_port
from lab.twin import Outcome
from tests.bridgeharness import RunningBridge, served_card
from tests.sessionlink import echo_card


def reversing_card() -> InstantCard:
    return InstantCard(respond=echo_card)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("bridge_listens", [False, True], ids=["bridge-connects", "bridge-listens"])
def test_relay_against_the_device_peer(tmp_path, kind: str, bridge_listens: bool) -> None:
    path = str(tmp_path / "vsc.sock")
    if bridge_listens:
        # The bridge listens first; the peer plays QEMU with reconnect=.
        endpoint = (
            Endpoint("unix", True, path=path)
            if kind == "unix"
            else Endpoint("tcp", True, host="127.0.0.1", port=free_tcp_port())
        )
        bridge = RunningBridge(served_card(endpoint), reversing_card())
        peer = DevicePeer(kind, listen=False, path=path, port=endpoint.port or 0)
    else:
        peer = DevicePeer(kind, listen=True, path=path)
        bridge = RunningBridge(served_card(peer.endpoint), reversing_card())
    with peer, bridge:
        peer.wait_card(True)
        assert peer.device.atr == DEFAULT_ATR
        for apdu in (b"\x00\xa4\x04\x00\x02\x3f\x00", b"\x00\x84\x00\x00\x08", bytes(300)):
            answer = peer.guest(apdu)
            assert answer.outcome is Outcome.RESPONSE
            assert answer.data == echo_card(apdu)
        if kind == "unix" and bridge_listens:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_second_connection_is_refused_and_the_first_keeps_working(tmp_path) -> None:
    path = str(tmp_path / "vsc.sock")
    bridge = RunningBridge(served_card(Endpoint("unix", True, path=path)), reversing_card())
    with bridge, DevicePeer("unix", listen=False, path=path) as peer:
        peer.wait_card(True)
        intruder = socket.socket(socket.AF_UNIX)
        intruder.connect(path)
        intruder.settimeout(2)
        assert intruder.recv(100) == b""  # closed at once, nothing said
        intruder.close()
        bridge.wait_log("refused a second connection")
        assert peer.guest(b"\x00\xb0\x00\x00\x04").outcome is Outcome.RESPONSE


@pytest.mark.parametrize(
    "garbage",
    [
        bytes.fromhex("00000063000000000000000201 02".replace(" ", "")),  # unknown type
        bytes.fromhex("000000070000000000100001"),  # over 64 KiB
        bytes.fromhex("00000006000000000000000401020304"),  # CardRemove from QEMU
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["unknown-type", "oversized", "wrong-direction", "http"],
)
def test_garbage_peer_loses_its_connection_and_the_next_peer_is_served(tmp_path, garbage) -> None:
    path = str(tmp_path / "vsc.sock")
    with RunningBridge(served_card(Endpoint("unix", True, path=path)), reversing_card()) as bridge:
        bridge.wait_log("listening on")
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(path)
        bad.settimeout(3)
        bad.sendall(garbage)
        received = b""
        while True:  # the bridge's handshake, then the close
            chunk = bad.recv(4096)
            if not chunk:
                break
            received += chunk
        bad.close()
        line = bridge.wait_log("connection dropped")
        assert "Traceback" not in bridge.text() and len(line.splitlines()) == 1
        with DevicePeer("unix", listen=False, path=path) as peer:
            peer.wait_card(True)
            assert peer.guest(b"\x00\xa4\x00\x00").outcome is Outcome.RESPONSE


def test_truncated_frame_then_close_is_survived(tmp_path) -> None:
    path = str(tmp_path / "vsc.sock")
    with RunningBridge(served_card(Endpoint("unix", True, path=path)), reversing_card()) as b:
        b.wait_log("listening on")
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.settimeout(3)
        assert s.recv(4096)  # the bridge's Init: it has nothing more to write until acked
        s.sendall(b"\x00\x00\x00\x07\x00\x00")
        s.close()
        b.wait_log("6 bytes of an unfinished frame")
        with DevicePeer("unix", listen=False, path=path) as peer:
            peer.wait_card(True)
            assert peer.guest(b"\x00\xa4\x00\x00").outcome is Outcome.RESPONSE


def test_stale_socket_file_is_replaced_but_a_regular_file_is_not(tmp_path) -> None:
    path = tmp_path / "vsc.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    with RunningBridge(served_card(Endpoint("unix", True, path=str(path))), reversing_card()) as b:
        b.wait_log("listening on")
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(TransportError, match="is not a socket"):
        RunningBridge(served_card(Endpoint("unix", True, path=str(precious))), reversing_card())
    assert precious.read_text() == "mine"


# -- real QEMU 7.2 -------------------------------------------------------------------


# The handshake with real QEMU, both ways, runs per stack in tests/test_stacks_runtime.py.


@pytest.mark.qemu
@pytest.mark.parametrize("trace", [0, 2], ids=["trace-off", "trace-vv"])
def test_qemu_killed_and_restarted_bridge_resyncs_from_its_capped_backoff(
    qemu_passthru, trace: int
) -> None:
    first: QemuPassthru = qemu_passthru("tcp")
    ep = first.endpoint
    with RunningBridge(
        served_card(_bridge_side(ep, listens=False)), InstantCard(), trace=trace
    ) as b:
        b.wait_synced()
        first.kill()
        b.wait(lambda br: not br.connected.is_set())
        time.sleep(1.5)  # the bridge is now in its capped backoff
        second = qemu_passthru("tcp", endpoints=[ep])  # returns once QEMU listens
        b.wait_synced(5)  # how fast: benchmarks (recovery)
        assert second.pid


@pytest.mark.qemu
def test_bridge_killed_and_restarted_resyncs(qemu_passthru) -> None:
    qemu: QemuPassthru = qemu_passthru("unix")
    ep = _bridge_side(qemu.endpoint, listens=False)
    first = RunningBridge(served_card(ep), InstantCard())
    first.wait_synced()
    first.stop(graceful=False)  # vanishes without a word, like kill -9
    with RunningBridge(served_card(ep), InstantCard()) as second:
        second.wait_synced()


def _bridge_side(ep: TcpEndpoint | UnixEndpoint, listens: bool) -> Endpoint:
    if isinstance(ep, UnixEndpoint):
        return Endpoint("unix", listens, path=ep.path)
    return Endpoint("tcp", listens, host=ep.host, port=ep.port)


# -- backpressure ---------------------------------------------------------------------


def _handshake_as_qemu(conn: socket.socket, dec: FrameDecoder) -> None:
    """Ack the bridge's resync the way QEMU does, until its ATR is acked."""
    while True:
        data = conn.recv(4096)
        assert data, "the bridge closed during the handshake"
        for raw in dec.feed(data):
            msg = decode(raw)
            if isinstance(msg, ReaderRemove | ReaderAdd):
                conn.sendall(encode(Error(0)))
            elif isinstance(msg, Atr):
                conn.sendall(encode(Error(0)))
                return


@pytest.mark.parametrize("trace", [0, 2], ids=["trace-off", "trace-vv"])
def test_a_peer_that_stops_reading_gets_no_new_commands_in_and_all_answers_later(
    tmp_path, trace: int
) -> None:
    path = str(tmp_path / "q.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    server.settimeout(5)
    bridge = RunningBridge(
        served_card(Endpoint("unix", False, path=path)), reversing_card(), trace=trace
    )
    try:
        conn, _ = server.accept()
        conn.settimeout(5)
        dec = FrameDecoder()
        _handshake_as_qemu(conn, dec)
        # Send commands and never read: the bridge must stop taking them in.
        conn.setblocking(False)
        sent = 0
        stalled = 0
        while stalled < 50:
            apdu = b"\x80\x10\x00\x00\x04" + sent.to_bytes(4, "big")
            try:
                conn.sendall(frame(MsgType.APDU, 0, apdu))
            except BlockingIOError:
                stalled += 1
                time.sleep(0.01)
                continue
            sent += 1
            assert sent < 200_000, "the bridge kept taking commands from a peer that never reads"
        held = len(bridge.bridge._out)  # what the bridge buffers while the peer does not read
        assert held < OUT_HIGH_WATER + 2 * READ_SIZE, held  # the answers to one read, at most
        # Read again: every command is answered exactly once, in order.
        conn.settimeout(5)
        got = 0
        while got < sent:
            data = conn.recv(65536)
            assert data
            for raw in dec.feed(data):
                msg = decode(raw)
                assert isinstance(msg, Apdu), msg
                apdu = b"\x80\x10\x00\x00\x04" + got.to_bytes(4, "big")
                assert msg.data == echo_card(apdu)
                got += 1
        assert got == sent and sent > 100
        conn.close()
    finally:
        server.close()
        bridge.stop()


def test_a_peer_that_stops_reading_then_goes_away_costs_only_its_connection(tmp_path) -> None:
    path = str(tmp_path / "q.sock")
    bridge = RunningBridge(served_card(Endpoint("unix", True, path=path)), reversing_card())
    with bridge:
        bridge.wait_log("listening on")
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(path)
        conn.settimeout(5)
        _handshake_as_qemu(conn, FrameDecoder())
        conn.setblocking(False)
        stalled = 0
        while stalled < 50:  # until neither side takes more
            try:
                conn.sendall(frame(MsgType.APDU, 0, b"\x80\x10\x00\x00\x04\x01\x02\x03\x04"))
            except BlockingIOError:
                stalled += 1
                time.sleep(0.01)
        conn.close()  # gone, with the bridge's answers unread
        bridge.wait_log("connection to QEMU closed")
        with DevicePeer("unix", listen=False, path=path) as peer:
            peer.wait_card(True)
            assert peer.guest(b"\x00\xa4\x00\x00").data == echo_card(b"\x00\xa4\x00\x00")


def test_peers_knocking_while_the_bridge_says_goodbye_are_turned_away(tmp_path) -> None:
    """The old runtime raised inside an asyncio callback when a peer connected
    between the goodbye's last ack and the listener's close."""
    path = str(tmp_path / "q.sock")
    bridge = RunningBridge(served_card(Endpoint("unix", True, path=path)), reversing_card())
    with DevicePeer("unix", listen=False, path=path) as peer:
        peer.wait_card(True)
        stopper = threading.Thread(target=bridge.bridge.stop)
        stopper.start()
        knocks = 0
        while stopper.is_alive():
            knock = socket.socket(socket.AF_UNIX)
            with contextlib.suppress(OSError):
                knock.connect(path)
                knocks += 1
            knock.close()
        stopper.join()
        peer.wait_card(False)
        types = [f[0] for f in peer.device.received]
        assert types[-2:] == [6, 4], types  # CardRemove, then ReaderRemove
    assert bridge.bridge.finished.is_set() and bridge.bridge.failure is None
    assert "Traceback" not in bridge.text() and "failed" not in bridge.text()
    bridge.stop()
