"""Item 6, ``scale``: 16 cards bridged by one process at once.

Alternating phases, several rounds: a bridge process serving a single card,
then a bridge process serving 16 cards (each with its own card side, socket
and peer; pcscd lists at most 16 readers, so the two cannot run side by
side).  The peer times APDUs against the single card, and against the 16
cards in turn (round robin, one APDU in flight at a time): does serving 16
cards (16 monitors, 16 workers, 16 connections) make each APDU slower?
Reported: p99 of the 16-card bridge over the single-card p99 (target <= 1.5),
and the medians.

``busy`` adds the case where all 16 are driven at once (one peer thread per
card, closed loop): aggregate APDU/s over the single card's APDU/s, and the
per-APDU p99.  On a 2-core machine this is bound by CPU, not by the bridge's
design; it is reported for orientation, not against the target.

Card kinds: ``vpcd`` (the project's test card, one process per vpcd slot, real
pcscd) and ``instant`` (InstantCard behind the card-side interface).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

from benchmarks.apdu import close_cards, insert_cards
from benchmarks.common import (
    GET_CHALLENGE,
    Child,
    Peer,
    apdu_frame,
    children,
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


def _measure(readers: list[str], rounds: int, block: int, busy_apdus: int) -> dict[str, object]:
    """Phases, alternating every round: a bridge serving one card, then a bridge
    serving 16 (pcscd lists at most 16 readers, so the two cannot run side by side)."""
    frame = apdu_frame(GET_CHALLENGE)
    n = len(readers)
    one: list[int] = []
    many_rt: list[int] = []
    lat: list[list[int]] = [[] for _ in range(n)]
    single_rates: list[float] = []
    busy_rates: list[float] = []
    with workdir() as tmp, contextlib.ExitStack() as closers:
        single = Peer("unix", tmp, "single")
        many = [Peer("unix", tmp, f"card{i}") for i in range(n)]
        for p in (single, *many):
            closers.callback(p.close)
        for r in range(rounds):
            for phase in ("1", "n") if r % 2 == 0 else ("n", "1"):
                with children() as kids:
                    if phase == "1":
                        _bridge(kids, [single], readers[:1])
                        for _ in range(200):
                            single.roundtrip(frame)
                        t0 = time.perf_counter()
                        for _ in range(block):
                            one.append(single.roundtrip(frame))
                        single_rates.append(block / (time.perf_counter() - t0))
                        continue
                    _bridge(kids, many, readers)
                    for i in range(200):
                        many[i % n].roundtrip(frame)
                    for i in range(block):
                        many_rt.append(many[i % n].roundtrip(frame))
                    busy_rates.append(_busy(many, frame, max(1, busy_apdus // n), lat))
    s1, s16 = summary(one), summary(many_rt)
    busy = summary([x for sub in lat for x in sub])
    single_rate = statistics.median(single_rates)
    busy_rate = statistics.median(busy_rates)
    return {
        "cards": n,
        "1 card": s1,
        "n cards": s16,
        "p99 ratio": s16["p99_us"] / s1["p99_us"],
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
    rounds: int = 4,
    block: int = 1600,
    busy_apdus: int = 1600,
    kinds: tuple[str, ...] = ("vpcd", "instant"),
) -> dict[str, object]:
    from ccidbridge.lab.pcsc import PcscStack

    results: dict[str, object] = {}
    for kind in kinds:
        if kind == "instant":
            results[kind] = _measure(["instant"] * N, rounds, block, busy_apdus)
            continue
        with PcscStack(N_PCSC // 2, debug=False) as stack:
            readers, handles = insert_cards(stack, kind, N_PCSC)
            try:
                results[kind] = _measure(readers, rounds, block, busy_apdus)
            finally:
                close_cards(handles)
    return results
