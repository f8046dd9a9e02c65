"""QEMU alone with ccid-card-passthru: starts, has a QMP monitor, answers VSCard Init;
on every stack's QEMU (7.2, 10.0, 11.1: lab.stacks) where it says ``qemu_stack``."""

from __future__ import annotations

import socket

import pytest

from lab.qemu import QemuPassthru

pytestmark = pytest.mark.qemu

INIT = bytes.fromhex("00000001 00000000 0000000c 56534344 00000002 00000000")
INIT_REPLY = bytes.fromhex("00000001 ffffffff 0000000c 56534344 00000002 00000000")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} bytes")
        buf += chunk
    return buf


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_answers_init(qemu_passthru, qemu_stack, transport: str) -> None:  # noqa: ANN001
    q: QemuPassthru = qemu_passthru(transport, stack=qemu_stack)
    assert "usb-ccid" in q.hmp("info qtree")
    assert "Product QEMU USB CCID, ID: ccid0" in q.hmp("info usb")
    with q.connect() as s:
        s.settimeout(5)
        s.sendall(INIT)
        assert _recv_exact(s, len(INIT_REPLY)) == INIT_REPLY


def test_qemu_connects_to_us(qemu_passthru, qemu_stack, tmp_path) -> None:  # noqa: ANN001
    """Client mode (reconnect=1): the bridge listens, QEMU dials in and sends nothing first."""
    from lab.qemu import UnixEndpoint

    ep = UnixEndpoint(str(tmp_path / "bridge.sock"))
    with ep.listen() as srv:
        srv.settimeout(10)
        qemu_passthru("unix", server=False, endpoints=[ep], stack=qemu_stack)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5)
            conn.sendall(INIT)
            assert _recv_exact(conn, len(INIT_REPLY)) == INIT_REPLY


def test_qemu_debug_and_kill(qemu_passthru) -> None:  # noqa: ANN001
    q: QemuPassthru = qemu_passthru("tcp", debug=True)
    with q.connect() as s:
        s.settimeout(5)
        s.sendall(INIT)
        _recv_exact(s, len(INIT_REPLY))
    pid = q.pid
    assert pid is not None
    q.kill()
    assert q.pid is None
    assert "CHR_EVENT_OPENED" in q.stdout()  # QEMU_CCID_PASSTHRU_DEBUG=4 output


def test_qemu_accepts_card_atr_presets(qemu_passthru, qemu_stack) -> None:  # noqa: ANN001
    """Every ATR preset of our test card passes QEMU's (buggy) check_atr, on each QEMU."""
    import struct

    from lab.vpcd_card import ATR_PRESETS

    q: QemuPassthru = qemu_passthru("tcp", stack=qemu_stack)
    with q.connect() as s:
        s.settimeout(5)
        for name, atr in ATR_PRESETS.items():
            s.sendall(struct.pack(">III", 5, 0, len(atr)) + atr)
            reply = _recv_exact(s, 16)
            assert reply == bytes.fromhex("00000002 00000000 00000004 00000000"), name
