"""The real-guest harness, proven without the bridge.

A test-only VSCard peer (below, built on :mod:`ccidbridge.protocol`'s codec)
plays the bridge on QEMU's ``ccid-card-passthru`` socket: ReaderAdd, an ATR,
``90 00``-style answers to every APDU, CardRemove on demand.  The guest's
pcscd + libccid + client must see the reader, the ATR, the removal, and get
the peer's responses to its APDUs.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.messages import (
    Apdu,
    Atr,
    CardRemove,
    Error,
    Init,
    Message,
    ReaderAdd,
    decode,
    encode,
)
from lab.bridgeproc import socket_device_args
from lab.guest import (
    GuestError,
    GuestHandle,
    GuestImage,
    GuestRun,
    build_guest,
    kernel_append,
)
from lab.guest.boot import parse_line
from lab.guest.cpio import CpioWriter

#: T=0-capable ATR (QEMU's reader is T=0 only, protocol/VSCARD.md#Q10), as in
#: protocol/vectors/qemu-7.2.json.
ATR = bytes.fromhex("3B8F8001804F0CA0000003060300030000000068")
SELECT = "00A4040007A0000000030000"
CHALLENGE = "0084000008"
#: Extended-length case 3: 7-byte header + 1000 data bytes.
UPDATE_1000 = "00D6000000" + "03E8" + "A5" * 1000


class VSCardPeer:
    """The bridge's side of the passthru socket, for tests: answers every APDU.

    ``respond(apdu) -> bytes`` makes the response (default ``90 00``).  Every
    APDU received is kept in ``apdus`` with the host time it arrived.
    """

    def __init__(self, path: str, respond: Callable[[bytes], bytes] | None = None):
        self.respond = respond or (lambda apdu: b"\x90\x00")
        self.apdus: list[tuple[float, bytes]] = []
        self.acks: queue.Queue[Message] = queue.Queue()
        self.sock = self._connect(path)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _connect(path: str, timeout: float = 10.0) -> socket.socket:
        """QEMU creates the listening socket while starting up: retry until it is there."""
        end = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)

    def _read(self) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for raw in decoder.feed(data):
                msg = decode(raw)
                if isinstance(msg, Apdu):
                    self.apdus.append((time.monotonic(), msg.data))
                    self.sock.sendall(encode(Apdu(self.respond(msg.data))))
                else:
                    self.acks.put(msg)

    def control(self, msg: Message, timeout: float = 5.0) -> Message:
        """Send a control message and return QEMU's reply (Error(0) or Init)."""
        self.sock.sendall(encode(msg))
        return self.acks.get(timeout=timeout)

    def insert(self, atr: bytes = ATR) -> None:
        """Init, ReaderAdd and ATR, each acknowledged."""
        assert isinstance(self.control(Init()), Init)
        assert self.control(ReaderAdd(b"test reader")) == Error(0, 0)
        self.reinsert(atr)

    def reinsert(self, atr: bytes = ATR) -> None:
        """A fresh ATR: card inserted."""
        assert self.control(Atr(atr)) == Error(0, 0)

    def remove(self) -> None:
        """CardRemove."""
        assert self.control(CardRemove()) == Error(0, 0)

    def close(self) -> None:
        """Close the socket (QEMU ignores it, the card stays inserted)."""
        self.sock.close()


def _respond(apdu: bytes) -> bytes:
    """GET CHALLENGE gets 8 bytes + 9000, everything else 9000."""
    if apdu.startswith(bytes.fromhex("00840000")):
        return bytes(range(1, 9)) + b"\x90\x00"
    return b"\x90\x00"


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A short Unix socket path (sun_path holds 107 bytes)."""
    path = tmp_path / "vsc.sock"
    assert len(os.fsencode(path)) < 100
    return str(path)


# ---------------------------------------------------------------------------- no QEMU


def test_parse_line_finds_prefix_mid_line() -> None:
    record = parse_line("[ 4.1] usb 1-1: x CCIDT apdu 0084000008 -> 9000 rv=0x00000000 ms=1.5 t=9",
                        1.0, 0)
    assert record is not None and record.kind == "apdu"
    assert record.fields == {"rv": "0x00000000", "ms": "1.5", "t": "9"}
    assert parse_line("plain kernel line", 1.0, 0) is None
    reader = parse_line("CCIDT reader t=5.0 name=Gemalto Reader (1) 00 00", 2.0, 1)
    assert reader is not None and reader.fields["name"] == "Gemalto Reader (1) 00 00"


def test_kernel_append_validates() -> None:
    line = kernel_append("wait-card,apdu:00", pcscd_log=1, guest_timeout=10)
    assert line.endswith("guest_timeout=10 pcscd_log=1 steps=wait-card,apdu:00")
    with pytest.raises(ValueError):
        kernel_append("mark:two words")
    with pytest.raises(ValueError):
        kernel_append(",".join(["apdu:" + "00" * 100] * 20))


def test_cpio_writer_layout() -> None:
    cpio = CpioWriter()
    cpio.file("a/b/c", b"xyz", 0o755)
    cpio.char_device("dev/console", 5, 1)
    data = cpio.getvalue()
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert data.count(b"070701") == 6  # a, a/b, a/b/c, dev, dev/console, trailer
    assert b"TRAILER!!!\0" in data


# ---------------------------------------------------------------------------- with QEMU


@pytest.mark.guest
def test_build_is_cached(guest_image: GuestImage) -> None:
    started = time.monotonic()
    again = build_guest(guest_image.initrd.parents[2])
    assert again.cached and again.initrd == guest_image.initrd
    assert time.monotonic() - started < 2.0
    assert guest_image.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert guest_image.kernel_version.endswith("-amd64")


@pytest.mark.guest
def test_guest_apdu_mode(start_guest: Callable[..., GuestHandle], sock_path: str) -> None:
    """apdus= mode: reader, ATR, APDUs reach the peer, responses reach the guest.

    The 1007-byte extended UPDATE BINARY makes the APDU list too long for the
    kernel command line, so it also exercises the initrd overlay.
    """
    guest = start_guest(socket_device_args(sock_path), apdus=[SELECT, CHALLENGE, UPDATE_1000],
                        params={"repeat": 2}, timeout=40)
    assert "apdus=" not in " ".join(guest.argv)  # went through the overlay
    peer = VSCardPeer(sock_path, _respond)
    peer.insert()
    run = guest.result()
    peer.close()
    _report("apdu mode", run, guest, peer)
    run.check()
    assert run.reader and "433" in run.reader
    assert run.atr == ATR
    commands = [bytes.fromhex(c) for c in (SELECT, CHALLENGE, UPDATE_1000)] * 2
    assert [a.command for a in run.apdus] == commands
    assert [apdu for _, apdu in peer.apdus] == commands
    assert all(a.rv == 0 for a in run.apdus)
    assert [a.response for a in run.apdus] == [_respond(c) for c in commands]


@pytest.mark.guest
def test_guest_remove_and_insert(start_guest: Callable[..., GuestHandle], sock_path: str) -> None:
    """steps= mode: CardRemove is seen as removal, a new ATR as insertion; reconnect works."""
    steps = ",".join([
        "wait-card", f"apdu:{CHALLENGE}", "wait-remove:10000", f"apdu:{CHALLENGE}",
        "wait-insert:10000", "reconnect", f"apdu:{SELECT}", f"burst:50:{CHALLENGE}", "status",
        "mark:end",
    ])
    guest = start_guest(socket_device_args(sock_path), steps, timeout=40, pcscd_log=1)
    peer = VSCardPeer(sock_path, _respond)
    peer.insert()
    guest.wait_for("step n=2 wait-remove", timeout=30)
    removed_at = time.monotonic() - guest.started
    peer.remove()
    empty = guest.wait_for("state empty", timeout=10)
    guest.wait_for("step n=4 wait-insert", timeout=10)
    inserted_at = time.monotonic() - guest.started
    peer.reinsert()
    present = guest.wait_for("state present", timeout=10)
    guest.wait_for("mark end", timeout=10)
    print(f"\n[remove/insert] CardRemove -> guest EMPTY {empty.host_t - removed_at:.3f}s, "
          f"ATR -> guest PRESENT {present.host_t - inserted_at:.3f}s")
    run = guest.result()
    peer.close()
    _report("remove/insert", run, guest, peer)
    run.check()
    first, during_removal, after = run.apdus
    assert first.ok and first.response == _respond(bytes.fromhex(CHALLENGE))
    assert during_removal.rv == 0x80100069  # SCARD_W_REMOVED_CARD
    assert after.ok and after.response == b"\x90\x00"
    flags = [s.flags for s in run.states]
    assert any("empty" in f for f in flags) and "present" in flags[-1]
    assert len(run.atrs) == 2 and set(run.atrs) == {ATR}
    log = "\n".join(run.pcscd_log)
    assert "Card Removed" in log and "Card inserted" in log
    burst = run.of_kind("burst")[0].fields
    assert burst["ok"] == "50" and burst["last"] == _respond(bytes.fromhex(CHALLENGE)).hex()
    print(f"[remove/insert] guest SCardTransmit over the peer: avg {burst['avg_ms']} ms, "
          f"max {burst['max_ms']} ms")
    status = run.of_kind("status")[0].fields
    assert status["rv"] == "0x00000000" and status["atr"] == ATR.hex()
    sent = [bytes.fromhex(CHALLENGE), bytes.fromhex(SELECT)] + [bytes.fromhex(CHALLENGE)] * 50
    assert [apdu for _, apdu in peer.apdus] == sent


@pytest.mark.guest
def test_guest_monitor_mode(start_guest: Callable[..., GuestHandle], sock_path: str) -> None:
    """mode=monitor prints each state change with a timestamp.

    The devices come in libvirt's JSON ``-device`` form with their own USB
    controller, as ``ccidbridge qemu-argv --usb`` prints them for QEMU 7.2.
    """
    devices = socket_device_args(sock_path, add_usb=True)
    guest = start_guest(devices, timeout=40, params={"mode": "monitor", "monitor_ms": 20000})
    assert sum("qemu-xhci" in arg for arg in guest.argv) == 1
    peer = VSCardPeer(sock_path)
    guest.wait_for("state empty", timeout=30)
    peer.insert()
    present = guest.wait_for("state present", timeout=10)
    peer.remove()
    empty = guest.wait_for("state empty", timeout=10)
    guest.kill()
    assert present.guest_t is not None and empty.guest_t is not None
    assert empty.guest_t > present.guest_t
    assert present.fields["atr"] == ATR.hex()


@pytest.mark.guest
def test_host_timeout_kills_qemu(start_guest: Callable[..., GuestHandle], sock_path: str) -> None:
    """A guest that would run forever is killed by PID at the host deadline."""
    started = time.monotonic()
    guest = start_guest(socket_device_args(sock_path), "sleep:600000", timeout=3,
                        params={"guest_timeout": 600})
    with pytest.raises(GuestError):
        guest.wait_for("done", timeout=60)
    run = guest.result()
    assert run.timed_out and run.returncode is not None
    assert time.monotonic() - started < 6
    with pytest.raises(ProcessLookupError):
        os.kill(guest.pid, 0)


def _report(name: str, run: GuestRun, guest: GuestHandle, peer: VSCardPeer) -> None:
    """Print the timings (visible with ``pytest -s``)."""
    first_apdu = peer.apdus[0][0] - guest.started if peer.apdus else None
    print(f"\n[{name}] qemu start -> first APDU at the peer: {first_apdu}s, "
          f"whole run {run.wall_seconds:.2f}s, client rc {run.client_rc}")
