"""Item 6, ``scale``: 16 cards bridged by one process at once.

A bridge process serving a single card against a bridge process serving N
cards (each with its own card side, socket and peer), pinned to CPU 0 and
free (as items 1 and 2).  The peer times APDUs against the single card, and
against the N cards in turn (round robin, one APDU in flight at a time):
does serving N cards (N card sides, N connections) make each APDU slower?
Reported: the N-card p99 over the single-card p99 (target <= 1.5), and the
medians.

Phases alternate every round, each in a fresh bridge process, so that the
scheduler's placement of the processes (which, free, decides between fast
and slow round trips for a process's whole life) is drawn again each time.
Running both bridges side by side and interleaving finely was tried: free,
one bridge landed in the slow placement for the whole run (medians 20 vs
48 us), which measures luck, not the bridge; with PC/SC cards it is not
possible anyway (pcscd lists at most 16 readers, and every card side
watches them all).

* ``instant``: 16 InstantCards.
* ``vpcd``: the project's test card in vpcd slots, one process per card,
  real pcscd; 14 cards, not 16: see :data:`N_PCSC`.

``busy`` adds the case where all N are driven at once (one peer thread per
card, closed loop): aggregate APDU/s over the single card's APDU/s, and the
per-APDU p99.  On a 2-core machine this is bound by CPU, not by the bridge's
design; it is reported for orientation, not against the target.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

from benchmarks.apdu import close_cards, insert_cards, interleave
from benchmarks.common import (
    GET_CHALLENGE,
    Child,
    Peer,
    apdu_frame,
    children,
    pinned,
    spawn,
    summary,
    workdir,
)

N = 16
#: With real PC/SC cards: pcscd 1.9.9 lists at most 16 readers, and the PC/SC
#: card side watches every reader plus ``\\?PnP?\Notification`` in one
#: SCardGetStatusChange, which pcsc-lite refuses beyond 16 states
#: (SCARD_E_INVALID_PARAMETER): with 16 vpcd readers it serves no card at all.
#: So 14 (7 vpcd entries) until the card side handles 16.
N_PCSC = 14


def _bridge(kids: list[Child], peers: list[Peer], readers: list[str]) -> Child:
    args = ["-m", "benchmarks.servers", "bridge"]
    for p, r in zip(peers, readers, strict=True):
        args += ["--endpoint", p.arg, "--reader", r]
    kid = spawn("bridge", args)
    kids.append(kid)
    for p in peers:
        p.accept()
    for p in peers:
        p.handshake()
    return kid


def _measure(
    readers: list[str], rounds: int, block: int, busy_apdus: int, *, side_by_side: bool
) -> dict[str, object]:
    """The single-card bridge against the N-card bridge.

    ``side_by_side`` (instant cards): both bridge processes run at once and
    the two variants interleave in short blocks, ``rounds`` x 4 of
    ``block`` / 4 — the finest mixing, so scheduler luck is shared out.
    Otherwise (PC/SC cards: pcscd lists at most 16 readers, and each card side
    watches them all) phases alternate every round, each in a fresh bridge
    process serving ``readers[:1]`` or all of ``readers``.  "All busy" runs
    once, in the last N-card phase.
    """
    frame = apdu_frame(GET_CHALLENGE)
    n = len(readers)
    one: list[int] = []
    many_rt: list[int] = []
    lat: list[list[int]] = [[] for _ in range(n)]
    single_rate = busy_rate = 0.0
    rounds_1: list[float] = []  # p99 of each phase
    rounds_n: list[float] = []
    with workdir() as tmp, contextlib.ExitStack() as closers:
        single = Peer("unix", tmp, "single")
        many = [Peer("unix", tmp, f"card{i}") for i in range(n)]
        for p in (single, *many):
            closers.callback(p.close)
        turn = [0]

        def round_robin() -> int:
            i = turn[0]
            turn[0] = (i + 1) % n
            return many[i].roundtrip(frame)

        def one_card() -> int:
            return single.roundtrip(frame)

        def rates() -> tuple[float, float]:
            t0 = time.perf_counter()
            for _ in range(busy_apdus):
                single.roundtrip(frame)
            alone = busy_apdus / (time.perf_counter() - t0)
            return alone, _busy(many, frame, max(1, busy_apdus // n), lat)

        if side_by_side:
            with children() as kids:
                _bridge(kids, [single], readers[:1])
                _bridge(kids, many, readers)
                raw = interleave({"1": one_card, "n": round_robin}, rounds * 4, max(1, block // 4))
                one, many_rt = raw["1"], raw["n"]
                single_rate, busy_rate = rates()
        else:
            for r in range(rounds):
                for phase in ("1", "n") if r % 2 == 0 else ("n", "1"):
                    with children() as kids:
                        if phase == "1":
                            _bridge(kids, [single], readers[:1])
                            for _ in range(200):
                                one_card()
                            got = [one_card() for _ in range(block)]
                            rounds_1.append(summary(got)["p99_us"])
                            one += got
                            continue
                        _bridge(kids, many, readers)
                        for _ in range(200):
                            round_robin()
                        got = [round_robin() for _ in range(block)]
                        rounds_n.append(summary(got)["p99_us"])
                        many_rt += got
                        if r == rounds - 1:
                            busy_rate = _busy(many, frame, max(1, busy_apdus // n), lat)
            with children() as kids:
                _bridge(kids, [single], readers[:1])
                t0 = time.perf_counter()
                for _ in range(busy_apdus):
                    one_card()
                single_rate = busy_apdus / (time.perf_counter() - t0)
    s1, s16 = summary(one), summary(many_rt)
    busy = summary([x for sub in lat for x in sub])
    return {
        "cards": n,
        "side by side": side_by_side,
        "1 card": s1,
        "n cards": s16,
        "p99 ratio": s16["p99_us"] / s1["p99_us"],
        # The same, per round (each N-card phase against its round's 1-card
        # phase), then the median: one disturbed phase cannot decide it.
        "p99 ratio, median of rounds": statistics.median(
            n / one for n, one in zip(rounds_n, rounds_1, strict=False)
        )
        if rounds_1
        else float("nan"),
        "median ratio": s16["median_us"] / s1["median_us"],
        "busy": {
            "single APDU/s": single_rate,
            "all at once APDU/s": busy_rate,
            "throughput ratio": busy_rate / single_rate,
            "per-APDU": busy,
        },
    }


def _busy(many: list[Peer], frame: bytes, per: int, lat: list[list[int]]) -> float:
    """All 16 at once, one closed-loop thread per card; returns aggregate APDU/s."""

    def hammer(i: int) -> None:
        rt, out = many[i].roundtrip, lat[i]
        for _ in range(per):
            out.append(rt(frame))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(many))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * len(many) / (time.perf_counter() - t0)


def run_scale(
    rounds: int = 8,
    block: int = 800,
    busy_apdus: int = 1600,
    kinds: tuple[str, ...] = ("vpcd", "instant"),
    modes: tuple[int | None, ...] = (0, None),
) -> dict[str, object]:
    """Each card kind, pinned to CPU 0 and free (see :func:`benchmarks.common.pinned`)."""
    from lab.pcsc import PcscStack

    results: dict[str, object] = {}
    for cpu in modes:
        with pinned(cpu) as mode:
            for kind in kinds:
                if kind == "instant":
                    results[f"{mode} {kind}"] = _measure(
                        ["instant"] * N, rounds, block, busy_apdus, side_by_side=False
                    )
                    continue
                with PcscStack(N_PCSC // 2, debug=False) as stack:
                    readers, handles = insert_cards(stack, kind, N_PCSC)
                    try:
                        results[f"{mode} {kind}"] = _measure(
                            readers, rounds, block, busy_apdus, side_by_side=False
                        )
                    finally:
                        close_cards(handles)
    return results
