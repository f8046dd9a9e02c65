"""Items 1 and 2: what one APDU costs through the bridge.

**Item 1, ``apdu``** — the round trip a guest feels, on the real stack:
timing peer (QEMU's end, a real socket) -> the process under test -> pcscd
-> vpcd -> card process -> back.  Side by side in the same run, every
variant serving its own identical card (same program, same pcscd, same vpcd,
neighbouring slots; each holds its card exclusively, as the bridge does by
default):

* ``bridge``: ccidbridge as ``ccidbridge run`` runs it (its Service, the
  real PC/SC card side), in a process of its own;
* ``relay``: a minimal blocking relay — read a frame, SCardTransmit, write
  the answer; no protocol (:func:`benchmarks.servers.run_relay`);
* ``session relay`` (design probe): ccidbridge's BridgeSession driven by a
  blocking ``recv`` loop that calls SCardTransmit itself: the product's
  APDU thread without its ``poll``, watchdog hand-off, timers and card events;
* ``vscclient`` (TCP only: it speaks nothing else): libcacard 2.8.0's
  ``vscclient -e passthru``, the C program ccidbridge replaces, built by
  ``make bench-deps`` (:mod:`benchmarks.vscclient`);
* ``direct``: a plain ``SCardTransmit`` from this process, no socket;
* ``socket floor``: a card-less responder answering every frame at once;
  ``floor`` = ``direct`` + ``socket floor``, summed sample by sample: what a
  bridge that costs nothing would measure.

Rounds: every variant runs one block per round, the order rotated every
round.  Reported per variant: the median and p99 of all samples; per pair
(bridge/relay, bridge/vscclient, ...) the ratio of the two block medians of
each round, whose median and spread (min, max, quartiles) are the figures to
judge by, since both blocks of a round saw the same machine.  Wake-ups: the
serving process's voluntary + involuntary context switches (all its threads,
from ``/proc/PID/task/*/status``) and its CPU time (``schedstat``), read
before and after every block, divided by the APDUs; pcscd's the same way.

**Item 2, ``overhead``** — the same socket path with card time removed: the
bridge with an :class:`~lab.instant_card.InstantCard` behind the
card-side interface, against the socket floor above and against a plain echo
of the bytes (:func:`benchmarks.servers.run_echo`).  Reports the ratios and
the microseconds the bridge adds (median minus median).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smartcard import scard

from benchmarks import vscclient as vscclient_build
from benchmarks.common import (
    GET_CHALLENGE,
    ZERO,
    Child,
    Counters,
    Peer,
    apdu_frame,
    children,
    counters,
    pinned,
    quantile,
    spawn,
    summary,
    workdir,
)

SOCKETS = ("unix", "tcp")
CARDS = ("vpcd", "vicc")
#: One card each; vscclient's must be in the first reader pcscd lists (see
#: :func:`_roles`).
ROLES = ("vscclient", "bridge", "relay", "session relay", "direct")
#: (numerator, denominator) pairs reported as per-round ratios, when both ran.
PAIRS = (
    ("bridge", "relay"),
    ("bridge", "vscclient"),
    ("relay", "vscclient"),
    ("bridge", "session relay"),
    ("session relay", "relay"),
    ("bridge", "direct"),
    ("relay", "direct"),
    ("bridge", "floor"),
    ("relay", "floor"),
)


@dataclass
class Rounds:
    """Samples (ns) per variant per round, and what each serving process and
    pcscd spent during that variant's blocks."""

    samples: dict[str, list[list[int]]]
    cost: dict[str, Counters] = field(default_factory=dict)
    pcscd: dict[str, Counters] = field(default_factory=dict)

    def flat(self, name: str) -> list[int]:
        return [x for block in self.samples[name] for x in block]


def interleave_rounds(
    variants: dict[str, Callable[[], int]],
    rounds: int,
    block: int,
    warmup: int = 200,
    pids: dict[str, int] | None = None,
    pcscd: int | None = None,
) -> Rounds:
    """Run each variant ``block`` times per round, rotating the order every round.

    ``pids`` names the process serving a variant: its counters are read
    around each of its blocks (outside the timed calls).
    """
    pids = pids or {}
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    out = Rounds({name: [] for name in names})
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = variants[name]
            pid = pids.get(name)
            before = counters(pid) if pid else ZERO
            pcscd_before = counters(pcscd) if pcscd else ZERO
            got = [fn() for _ in range(block)]
            if pcscd:
                out.pcscd[name] = out.pcscd.get(name, ZERO) + (counters(pcscd) - pcscd_before)
            if pid:
                out.cost[name] = out.cost.get(name, ZERO) + (counters(pid) - before)
            out.samples[name].append(got)
    return out


def interleave(
    variants: dict[str, Callable[[], int]], rounds: int, block: int, warmup: int = 200
) -> dict[str, list[int]]:
    """:func:`interleave_rounds`, every variant's samples in one list."""
    got = interleave_rounds(variants, rounds, block, warmup)
    return {name: got.flat(name) for name in variants}


def per_round_ratio(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """The ratio of ``a``'s and ``b``'s block medians in each round: median and spread."""
    r = sorted(quantile(x, 0.5) / quantile(y, 0.5) for x, y in zip(a, b, strict=True))
    return {
        "median": statistics.median(r),
        "min": r[0],
        "max": r[-1],
        "q1": quantile(r, 0.25),
        "q3": quantile(r, 0.75),
        "rounds": len(r),
    }


def per_apdu(c: Counters, apdus: int) -> dict[str, float]:
    return {
        "voluntary": c.voluntary / apdus,
        "involuntary": c.involuntary / apdus,
        "wakeups": (c.voluntary + c.involuntary) / apdus,
        "cpu_us": c.cpu_ns / apdus / 1000,
    }


def _check_9000(peer: Peer, what: str) -> None:
    answer = peer.last_answer()
    if answer[-2:] != b"\x90\x00":
        raise RuntimeError(f"{what}: unexpected answer {answer.hex()}")


def _direct(reader: str) -> tuple[Callable[[], int], Callable[[], None]]:
    """A timed SCardTransmit to ``reader`` (exclusive, like the bridge) and a closer."""
    import time

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0, hex(hr)
    protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    hr, h, proto = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_EXCLUSIVE, protocols)
    if hr != 0:
        raise RuntimeError(f"direct connect to {reader!r} failed: {hr:#x}")
    apdu = GET_CHALLENGE
    transmit = scard.SCardTransmit
    clock = time.perf_counter_ns

    def once() -> int:
        t0 = clock()
        hr, resp = transmit(h, proto, list(apdu))
        answer = bytes(resp)
        t1 = clock()
        if hr != 0 or answer[-2:] != b"\x90\x00":
            raise RuntimeError(f"direct transmit: {hr:#x} {answer.hex()}")
        return t1 - t0

    def close() -> None:
        scard.SCardDisconnect(h, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)

    return once, close


def _serve(kids: list[Child], peer: Peer, mode: str, *extra: str, handshake: bool) -> Child:
    kid = spawn(mode, ["-m", "benchmarks.servers", mode, "--endpoint", peer.arg, *extra])
    kids.append(kid)
    peer.accept()
    if handshake:
        peer.handshake()
    return kid


def _vscclient(kids: list[Child], peer: Peer, binary: Path) -> Child:
    """``vscclient -e passthru 127.0.0.1 PORT``: it adds every PC/SC reader it
    sees and connects (shared) to every card not held already; the cards of
    the other variants are, so it serves the card of the first reader."""
    kid = spawn("vscclient", ["-e", "passthru", "127.0.0.1", str(peer.port)], program=str(binary))
    kids.append(kid)
    peer.accept()
    peer.handshake()
    peer.settle()
    return kid


def _timed(peer: Peer, frame: bytes) -> Callable[[], int]:
    rt = peer.roundtrip
    return lambda: rt(frame)


def measure_apdu(
    cards: dict[str, str],
    sock: str,
    rounds: int,
    block: int,
    vscclient: Path | None,
    pcscd: int | None,
) -> dict[str, object]:
    """Item 1 for one card kind and socket type; ``cards`` maps role -> reader."""
    frame = apdu_frame(GET_CHALLENGE)
    with workdir() as tmp, children() as kids, contextlib.ExitStack() as closers:
        names = ["bridge", "relay", "session relay", "socket floor"]
        if sock == "tcp" and vscclient is not None:
            names.append("vscclient")
        peers = {name: Peer(sock, tmp, name.replace(" ", "-")) for name in names}
        for p in peers.values():
            closers.callback(p.close)
        pids = {
            "bridge": _serve(kids, peers["bridge"], "bridge", "--reader", cards["bridge"],
                             handshake=True).pid,
            "relay": _serve(kids, peers["relay"], "relay", "--reader", cards["relay"],
                            handshake=False).pid,
            "session relay": _serve(kids, peers["session relay"], "session-relay",
                                    "--reader", cards["session relay"], handshake=True).pid,
            "socket floor": _serve(kids, peers["socket floor"], "floor", handshake=False).pid,
        }  # fmt: skip
        direct, close_direct = _direct(cards["direct"])
        closers.callback(close_direct)
        if "vscclient" in peers:  # last: every other card is held by now
            assert vscclient is not None
            pids["vscclient"] = _vscclient(kids, peers["vscclient"], vscclient).pid
        variants = {name: _timed(p, frame) for name, p in peers.items()}
        variants["direct"] = direct
        got = interleave_rounds(variants, rounds, block, pids=pids, pcscd=pcscd)
        for name, p in peers.items():
            _check_9000(p, name)
    got.samples["floor"] = [
        [a + b for a, b in zip(d, f, strict=True)]
        for d, f in zip(got.samples["direct"], got.samples["socket floor"], strict=True)
    ]
    stats = {name: summary(got.flat(name)) for name in got.samples}
    ratios = {
        f"{a}/{b}": per_round_ratio(got.samples[a], got.samples[b])
        | {"pooled": stats[a]["median_us"] / stats[b]["median_us"]}
        for a, b in PAIRS
        if a in got.samples and b in got.samples
    }
    apdus = rounds * block
    return {
        "rounds": rounds,
        "block": block,
        "stats": stats,
        "ratios": ratios,
        "round_medians_us": {
            name: [quantile(b, 0.5) / 1000 for b in blocks] for name, blocks in got.samples.items()
        },
        "per_apdu": {name: per_apdu(c, apdus) for name, c in got.cost.items()},
        "pcscd_per_apdu": {name: per_apdu(c, apdus) for name, c in got.pcscd.items()},
        "readers": cards,
    }


def _roles(readers: list[str]) -> dict[str, str]:
    """Role -> reader: vscclient's card in the reader pcscd lists first.

    vscclient adds every reader to QEMU's end in pcscd's order, and QEMU 7.2
    acks each ReaderAdd with reader id 0, so QEMU's APDUs (reader id 0) go
    to the first reader vscclient added.
    """
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0, hex(hr)
    try:
        hr, listed = scard.SCardListReaders(ctx, [])
        assert hr == 0, hex(hr)
    finally:
        scard.SCardReleaseContext(ctx)
    if listed[0] not in readers:
        raise RuntimeError(f"the first reader pcscd lists, {listed[0]!r}, has no card of ours")
    rest = [r for r in readers if r != listed[0]]
    return dict(zip(ROLES, [listed[0], *rest], strict=True))


def insert_cards(stack, kind: str, n: int) -> tuple[list[str], list[object]]:
    """``n`` cards of ``kind`` ("vpcd": the project's test card as a process;
    "vicc": Debian's vicc through the fixed wrapper) in the first free slots."""
    from lab.vicc import ViccProcess

    stack.ensure_slots(n)
    readers: list[str] = []
    handles: list[object] = []
    for _ in range(n):
        if kind == "vpcd":
            card = stack.insert_card(process=True, wait=False)
        else:
            card = ViccProcess(stack, verbose=False)
            card.start()
        readers.append(card.reader)
        handles.append(card)
    for reader in readers:  # all inserted at once: one pcscd poll, not n
        stack.wait_card_state(reader, True, timeout=10)
    return readers, handles


def close_cards(handles: list[object]) -> None:
    for h in handles:
        with contextlib.suppress(Exception):
            h.close()  # type: ignore[attr-defined]


def run_apdu(
    rounds: int = 10,
    block: int = 300,
    modes: tuple[int | None, ...] = (0, None),
    cards: tuple[str, ...] = CARDS,
) -> dict[str, object]:
    """Item 1 for each scheduling mode (pinned to CPU 0, free), card kind and socket type.

    Free mode uses 3x as many rounds of a third the size, so the scheduler's
    whims (see :func:`benchmarks.common.pinned`) are shared out more evenly.
    """
    from lab.pcsc import PcscStack

    binary = vscclient_build.BINARY
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: `make bench-deps` builds it")
    results: dict[str, object] = {}
    for cpu in modes:
        r, b = (rounds, block) if cpu is not None else (rounds * 3, max(1, block // 3))
        with pinned(cpu) as mode, PcscStack(3, debug=False) as stack:
            for kind in cards:
                readers, handles = insert_cards(stack, kind, len(ROLES))
                try:
                    roles = _roles(readers)
                    for sock in SOCKETS:
                        results[f"{mode} {kind} {sock}"] = measure_apdu(
                            roles, sock, r, b, binary, stack.pid
                        )
                finally:
                    close_cards(handles)
    return results


def run_overhead(
    rounds: int = 10, block: int = 300, modes: tuple[int | None, ...] = (0, None)
) -> dict[str, object]:
    """Item 2 for each scheduling mode and socket type."""
    results: dict[str, object] = {}
    for cpu in modes:
        r, b = (rounds, block) if cpu is not None else (rounds * 3, max(1, block // 3))
        with pinned(cpu) as mode:
            for sock in SOCKETS:
                results[f"{mode} {sock}"] = _overhead(sock, r, b)
    return results


def _overhead(sock: str, rounds: int, block: int) -> dict[str, object]:
    frame = apdu_frame(GET_CHALLENGE)
    with workdir() as tmp, children() as kids, contextlib.ExitStack() as closers:
        peers = {name: Peer(sock, tmp, name) for name in ("instant bridge", "floor", "echo")}
        for p in peers.values():
            closers.callback(p.close)
        _serve(kids, peers["instant bridge"], "bridge", "--reader", "instant", handshake=True)
        _serve(kids, peers["floor"], "floor", handshake=False)
        _serve(kids, peers["echo"], "echo", handshake=False)
        raw = interleave({n: _timed(p, frame) for n, p in peers.items()}, rounds, block)
        for name in ("instant bridge", "floor"):
            _check_9000(peers[name], name)
    stats = {name: summary(v) for name, v in raw.items()}
    i, f, e = stats["instant bridge"], stats["floor"], stats["echo"]
    return {
        "stats": stats,
        "ratios": {
            "instant/floor median": i["median_us"] / f["median_us"],
            "instant/floor p99": i["p99_us"] / f["p99_us"],
            "instant/echo median": i["median_us"] / e["median_us"],
            "instant/echo p99": i["p99_us"] / e["p99_us"],
        },
        "added_us": {
            "vs floor median": i["median_us"] - f["median_us"],
            "vs echo median": i["median_us"] - e["median_us"],
            "vs floor p99": i["p99_us"] - f["p99_us"],
        },
    }


__all__ = ["interleave", "quantile", "run_apdu", "run_overhead"]
