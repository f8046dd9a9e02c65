"""Item 5b, ``backpressure``: a peer that sends APDUs and never reads.

The bridge process serves one real PC/SC card (the project's vpcd test card)
over a Unix socket.  The peer plays QEMU through the handshake, then stops
reading and sends GET CHALLENGE frames as fast as the socket takes them (non
blocking, up to :data:`LIMIT`).  A bridge with backpressure stops reading
once its answers back up (``OUT_HIGH_WATER`` in ccidbridge/runtime/bridge.py),
so the kernel's socket buffers fill and the peer's sends stall: the peer
counts what got in.  At fb07541 the bridge kept reading instead, and held
200 000 answers (+84 MB, never returned; docs/benchmarks.md#B2).

Reported, VmRSS of the bridge process:

* idle after the handshake;
* when the peer's sends stall, and again :data:`HOLD` s later, with the
  bridge's wake-ups and CPU time over that hold (a stalled bridge must sleep,
  not spin on a writable-socket poll);
* after the peer reads every answer (each APDU it sent answered exactly once,
  ``90 00``) and after 1000 ordinary round trips;
* after a second stall that ends with the peer closing its socket unread and
  listening again, as a restarted QEMU would: the bridge reconnects and serves.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from benchmarks.common import (
    GET_CHALLENGE,
    Child,
    Peer,
    apdu_frame,
    counters,
    one_card_bridge,
)

#: The most APDUs the peer sends unread (the old runtime's figure).
LIMIT = 200_000
#: A send that has not gone through for this long means the bridge stopped reading.
STALL = 1.0
#: How long the stalled state is watched.
HOLD = 2.0
_HDR = struct.Struct(">III")


def _flood(sock: socket.socket, frame: bytes, limit: int) -> tuple[int, int]:
    """Send up to ``limit`` frames without reading; return (frames sent, bytes
    of a frame left unsent) when the socket stops taking them."""
    chunk = frame * 1000
    total = len(frame) * limit
    sent = 0
    sock.setblocking(False)
    try:
        while sent < total:
            view = memoryview(chunk)[: min(len(chunk), total - sent)]
            try:
                sent += sock.send(view)
                continue
            except BlockingIOError:
                pass
            _, writable, _ = select.select([], [sock], [], STALL)
            if not writable:
                break
    finally:
        sock.setblocking(True)
    whole, part = divmod(sent, len(frame))
    return whole, (len(frame) - part) % len(frame)


def _read_answers(sock: socket.socket, n: int, timeout: float = 60.0) -> int:
    """Read ``n`` answer frames; return how many were VSC_APDU + 90 00."""
    sock.settimeout(timeout)
    buf = bytearray()
    good = seen = 0
    try:
        while seen < n:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("backpressure: the bridge closed the connection")
            buf += data
            pos = 0
            while len(buf) - pos >= 12 and seen < n:
                msg_type, _, length = _HDR.unpack_from(buf, pos)
                end = pos + 12 + length
                if end > len(buf):
                    break
                seen += 1
                good += msg_type == 7 and buf[end - 2 : end] == b"\x90\x00"
                pos = end
            del buf[:pos]
    finally:
        sock.settimeout(None)
    if buf:
        raise RuntimeError(f"backpressure: {len(buf)} bytes after the last answer expected")
    return good


def _stall(peer: Peer, bridge: Child, frame: bytes) -> dict[str, float]:
    assert peer.sock is not None
    sent, rest = _flood(peer.sock, frame, LIMIT)
    stalled = bridge.rss_kib()
    before, t0 = counters(bridge.pid), time.monotonic()
    time.sleep(HOLD)
    cost, held = counters(bridge.pid) - before, time.monotonic() - t0
    return {
        "apdus_sent": sent,
        "rest": rest,
        "stalled_mib": stalled / 1024,
        "held_mib": bridge.rss_kib() / 1024,
        "hold_wakeups_per_s": (cost.voluntary + cost.involuntary) / held,
        "hold_cpu_ms_per_s": cost.cpu_ns / 1e6 / held,
    }


def run_backpressure() -> dict[str, object]:
    frame = apdu_frame(GET_CHALLENGE)
    with one_card_bridge() as (peer, bridge):
        time.sleep(0.5)
        idle = bridge.rss_kib() / 1024
        first = _stall(peer, bridge, frame)
        assert peer.sock is not None
        if first["rest"]:
            peer.sock.sendall(frame[-int(first["rest"]) :])
        n = int(first["apdus_sent"]) + (1 if first["rest"] else 0)
        t0 = time.monotonic()
        good = _read_answers(peer.sock, n)
        drained_s = time.monotonic() - t0
        if good != n:
            raise RuntimeError(f"backpressure: {good} of {n} answers were 90 00")
        after_read = bridge.rss_kib() / 1024
        t0 = time.monotonic()
        for _ in range(1000):
            peer.roundtrip(frame)
        closed_loop_s = time.monotonic() - t0
        after_more = bridge.rss_kib() / 1024
        # Stalled again, and this time the peer goes away without reading.
        second = _stall(peer, bridge, frame)
        peer.sock.close()
        peer.sock = None
        peer.accept()
        peer.handshake()
        for _ in range(1000):
            peer.roundtrip(frame)
        after_gone = bridge.rss_kib() / 1024
    return {
        "idle_mib": idle,
        "stall": first,
        "answers_read": good,
        "drain_s": drained_s,
        "drain_apdu_per_s": n / drained_s,
        "closed_loop_apdu_per_s": 1000 / closed_loop_s,
        "after_read_mib": after_read,
        "after_1000_more_mib": after_more,
        "second_stall": second,
        "after_peer_gone_mib": after_gone,
        "growth_stalled_mib": max(first["stalled_mib"], first["held_mib"]) - idle,
        "growth_after_mib": after_gone - idle,
    }
