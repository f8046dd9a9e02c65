"""Items 3, 4 and 5: card events, recovery after a QEMU restart, memory.

**Item 3, ``events``** — how late the bridge tells QEMU about a card.  An
independent observer (a thread of this process, blocked in
SCardGetStatusChange on the reader) timestamps the moment pcscd reports the
change; the timing peer timestamps the read that carries the ATR frame
(insertion) or the CardRemove frame (removal).  ``added`` is the difference,
per cycle.  pcscd's 400 ms presence poll delays both equally, so it cancels.
Insertions into a reader that has been empty for longer than session rule
R10's re-insertion pause are the target's case; quick re-insertions (card
back at once) are reported apart: there R10 holds the ATR on purpose.

**Item 4, ``recovery``** — real QEMU 7.2 (``ccid-card-passthru``, QEMU
listening as with libvirt's ``mode='bind'``) is SIGKILLed and, after a pause
that varies per cycle (:data:`DOWN_TIMES`, so every phase of the bridge's
reconnect backoff is hit), started again on the same socket.  Measured from
the first moment the new QEMU listens (polled every 0.5 ms from this
process) to the bridge's debug line for ``AtrAccepted`` arriving here (QEMU
acked the ATR; the line travels through a pipe, so this errs on the late
side).  Since session rule R10 the figure includes a deliberate pause
(``qemu.REINSERT_PAUSE``, 0.5 s): after a resync the card is announced only
once the guest has had time to see it gone.  Also reported: kill ->
listening (QEMU's own start time).

**Item 5, ``memory``** — VmRSS of the bridge process (one real PC/SC card,
Unix socket): idle after the handshake, after 10k APDUs, after 100k APDUs.
Growth is 100k minus idle; 100k minus 10k shows whether it keeps growing.
"""

from __future__ import annotations

import threading
import time

from smartcard import scard

from benchmarks.common import (
    GET_CHALLENGE,
    Peer,
    apdu_frame,
    children,
    one_card_bridge,
    spawn,
    summary,
    workdir,
)


class Observer(threading.Thread):
    """Records (perf_counter, present) each time pcscd reports a change on ``reader``."""

    def __init__(self, reader: str) -> None:
        super().__init__(name="observer", daemon=True)
        self.reader = reader
        self.changes: list[tuple[float, bool]] = []
        self._halt = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        assert hr == 0, hex(hr)
        state = scard.SCARD_STATE_UNAWARE
        last: bool | None = None
        try:
            while not self._halt.is_set():
                hr, states = scard.SCardGetStatusChange(ctx, 100, [(self.reader, state)])
                t = time.perf_counter()
                if hr == scard.SCARD_E_TIMEOUT:
                    self.ready.set()
                    continue
                if hr != 0:
                    raise RuntimeError(f"observer: {hr:#x}")
                event = states[0][1]
                present = bool(event & scard.SCARD_STATE_PRESENT) and not (
                    event & scard.SCARD_STATE_MUTE
                )
                if present != last:
                    self.changes.append((t, present))
                    last = present
                state = event & ~scard.SCARD_STATE_CHANGED
                self.ready.set()
        finally:
            scard.SCardReleaseContext(ctx)

    def wait(self, present: bool, after: float, timeout: float = 5.0) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            for t, p in list(self.changes):
                if t >= after and p is present:
                    return t
            time.sleep(0.001)
        raise TimeoutError(f"observer: no present={present} after {after}")

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def _has(msg_type: int):
    return lambda d: any(m[0] == msg_type for m in d.received)


def _reinsert_pause() -> float:
    """Session rule R10's pause (0 before R10 existed)."""
    from ccidbridge.protocol import qemu

    return float(getattr(qemu, "REINSERT_PAUSE", 0.0))


def run_events(cycles: int = 10) -> dict[str, object]:
    """``cycles`` insert/remove cycles with the reader left empty longer than
    session rule R10's re-insertion pause (the target's case), then as many
    quick re-insertions (the card back at once, so R10 holds the ATR on
    purpose until the guest has seen the card gone for the pause)."""
    from lab.pcsc import PcscStack

    pause = _reinsert_pause()
    ins: list[float] = []
    quick: list[float] = []
    rem: list[float] = []
    with PcscStack(1, debug=False) as stack, workdir() as tmp, children() as kids:
        reader = stack.readers[0]
        obs = Observer(reader)
        obs.start()
        obs.ready.wait(5)
        peer = Peer("unix", tmp)
        try:
            args = ["--endpoint", peer.arg, "--reader", reader]
            kids.append(spawn("bridge", ["-m", "benchmarks.servers", "bridge", *args]))
            peer.accept()
            peer.pump_until(_has(3))  # ReaderAdd: the bridge is up, no card yet
            card = None
            for i in range(2 * cycles):
                settled = i < cycles
                if settled:
                    # The reader stays empty past R10's pause (also after the
                    # connection's resync, which R10 treats the same way).
                    time.sleep(pause + 0.1)
                t0 = time.perf_counter()
                if card is None:
                    card = stack.insert_card(process=True, reader=reader, wait=False)
                else:
                    card.insert(wait=False)
                t_atr = peer.pump_until(lambda d: d.card_present)
                t_seen = obs.wait(True, t0)
                (ins if settled else quick).append((t_atr - t_seen) * 1e9)
                t0 = time.perf_counter()
                card.remove(wait=False)
                t_gone = peer.pump_until(lambda d: not d.card_present)
                t_seen = obs.wait(False, t0)
                rem.append((t_gone - t_seen) * 1e9)
            if card is not None:
                card.close()
        finally:
            peer.close()
            obs.stop()
    return {
        "insert -> ATR frame": summary(ins) | {"max_us": max(ins) / 1000},
        "remove -> CardRemove frame": summary(rem) | {"max_us": max(rem) / 1000},
        "quick re-insert -> ATR frame (R10 hold)": summary(quick)
        | {"max_us": max(quick) / 1000, "pause_s": pause},
    }


#: The bridge's debug log line for the session's AtrAccepted (QEMU acked the ATR).
ATR_ACKED = "QEMU accepted the ATR"


def _listening(kind: str, where: str | int) -> bool:
    from lab.qemu import tcp_listening, unix_listening

    return tcp_listening(where) if kind == "tcp" else unix_listening(where)  # type: ignore[arg-type]


#: How long QEMU stays dead in each recovery cycle (seconds after the kill,
#: before the new QEMU is started; QEMU then needs ~0.2 s to listen).  Spread
#: over the bridge's whole reconnect backoff (50 ms doubling to its cap), so
#: the worst phase — QEMU back just after an attempt at the cap — is sampled.
DOWN_TIMES = (0.0, 0.3, 0.6, 0.9, 1.3, 1.8, 2.4, 3.0)
DOWN_TIMES_QUICK = (0.0, 1.3, 2.4)


def run_recovery(
    down_times: tuple[float, ...] = DOWN_TIMES, kinds: tuple[str, ...] = ("unix", "tcp")
) -> dict[str, object]:
    from lab.pcsc import PcscStack

    results: dict[str, object] = {}
    with PcscStack(1, debug=False) as stack:
        card = stack.insert_card(process=True)
        try:
            for kind in kinds:
                results[kind] = _recovery_one(kind, card.reader, down_times)
        finally:
            card.close()
    return results


def _recovery_one(kind: str, reader: str, down_times: tuple[float, ...]) -> dict[str, object]:
    from lab.qemu import QemuPassthru, UnixEndpoint

    after_listen: list[float] = []
    kill_to_listen: list[float] = []
    cycles: list[dict[str, float]] = []
    with workdir() as tmp, children() as kids:
        qemu = QemuPassthru(kind, workdir=tmp).start()
        ep = qemu.endpoint
        where = ep.path if isinstance(ep, UnixEndpoint) else ep.port
        arg = f"unix:{where}" if kind == "unix" else f"tcp:{where}"
        try:
            bridge = spawn(
                "bridge",
                ["-m", "benchmarks.servers", "bridge", "-v", "--endpoint", arg, "--reader", reader],
                capture=True,
            )
            kids.append(bridge)
            bridge.wait_line(ATR_ACKED, timeout=15)
            for down in down_times:
                qemu.kill()
                t_kill = time.perf_counter()
                bridge.wait_line("connection to QEMU closed", after=t_kill - 1, timeout=5)
                time.sleep(down)
                seen: list[float] = []
                stop = threading.Event()

                def poll(seen: list[float] = seen, stop: threading.Event = stop) -> None:
                    while not stop.is_set():
                        if _listening(kind, where):
                            seen.append(time.perf_counter())
                            return
                        time.sleep(0.0005)

                poller = threading.Thread(target=poll, daemon=True)
                poller.start()
                qemu = QemuPassthru(kind, endpoints=[ep], workdir=tmp).start()
                poller.join(10)
                stop.set()
                t_sync = bridge.wait_line(ATR_ACKED, after=t_kill, timeout=15)
                t_listen = seen[0]
                after_listen.append((t_sync - t_listen) * 1e9)
                kill_to_listen.append((t_listen - t_kill) * 1e9)
                cycles.append(
                    {
                        "down_s": down,
                        "kill_to_listen_ms": (t_listen - t_kill) * 1000,
                        "listen_to_acked_ms": (t_sync - t_listen) * 1000,
                    }
                )
        finally:
            qemu.kill()
    return {
        "QEMU listens -> ATR acked": summary(after_listen) | {"max_us": max(after_listen) / 1000},
        "kill -> QEMU listens": summary(kill_to_listen) | {"max_us": max(kill_to_listen) / 1000},
        "cycles": cycles,
    }


def run_memory(apdus: int = 100_000) -> dict[str, object]:
    frame = apdu_frame(GET_CHALLENGE)
    with one_card_bridge() as (peer, bridge):
        time.sleep(1.0)
        idle = bridge.rss_kib()
        rt = peer.roundtrip
        t0 = time.perf_counter()
        for _ in range(10_000):
            rt(frame)
        warm = bridge.rss_kib()
        for _ in range(apdus - 10_000):
            rt(frame)
        seconds = time.perf_counter() - t0
        after = bridge.rss_kib()
        if peer.last_answer()[-2:] != b"\x90\x00":
            raise RuntimeError("memory: bad answer")
    return {
        "idle_mib": idle / 1024,
        "after_10k_mib": warm / 1024,
        f"after_{apdus // 1000}k_mib": after / 1024,
        "growth_mib": (after - idle) / 1024,
        "growth_10k_to_end_mib": (after - warm) / 1024,
        "apdus": apdus,
        "apdu_per_s": apdus / seconds,
    }
