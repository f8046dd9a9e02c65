"""Items 1 and 2: what one APDU costs through the bridge.

**Item 1, ``apdu``** — the round trip a guest feels, on the real stack:
timing peer (QEMU's end, a real socket) -> bridge process -> pcscd -> vpcd
-> card process -> back.  Measured in the same run, interleaved in blocks:

* ``bridged``: the bridge (``ccidbridge`` with its PC/SC card side, exclusive
  share, its default) serving card A;
* ``direct``: a plain ``SCardTransmit`` of the same APDU from this process to
  card B, an identical card (same program, same pcscd, same vpcd) in the
  neighbouring slot — the bridge holds card A exclusively, as it does by
  default, so the direct client cannot use that very card;
* ``socket floor``: the same peer against the least any bridge can be, a
  card-less responder that answers every APDU frame at once
  (:func:`benchmarks.servers.run_floor`);
* ``floor`` = ``direct`` + ``socket floor``, summed sample by sample (same
  round, same position), so it is a distribution too: what a bridge with
  zero cost of its own would measure;
* ``relay`` (calibration): the minimal blocking relay — read a frame,
  SCardTransmit, write the answer — serving card C;
* ``session relay`` (design probe): ccidbridge's BridgeSession driven by one
  blocking thread that calls SCardTransmit itself, serving card D: what a
  per-card APDU thread without event-loop and thread hand-offs would cost;
* ``bridged, card on loop`` (design probe): the bridge process with a card
  side that calls SCardTransmit on the event loop's own thread
  (:class:`benchmarks.servers.InlinePcscCard`, card F): the product's
  asyncio path with no thread hand-off, to split the gap between bridged and
  session relay into event loop and hand-off;
* ``bridged in-process``: the same CardBridge and PC/SC card side on a
  thread of this (the benchmark's) process, serving card E — cheaper to set
  up, but it shares the GIL with the timing peer; the product runs as its own
  process, so ``bridged`` is the figure that counts.

Ratios: bridged/direct, bridged/floor (target <= 1.10 at the median),
relay/floor (the calibration the bridge must beat) and session relay/floor.

**Item 2, ``overhead``** — the same socket path with card time removed: the
bridge with an :class:`~lab.instant_card.InstantCard` behind the
card-side interface, against the socket floor above and against a plain echo
of the bytes (:func:`benchmarks.servers.run_echo`).  Reports the ratios and
the microseconds the bridge adds (median minus median).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from smartcard import scard

from benchmarks.common import (
    GET_CHALLENGE,
    Child,
    Peer,
    apdu_frame,
    children,
    pinned,
    quantile,
    spawn,
    summary,
    workdir,
)

SOCKETS = ("unix", "tcp")
CARDS = ("vpcd", "vicc")


def interleave(
    variants: dict[str, Callable[[], int]], rounds: int, block: int, warmup: int = 200
) -> dict[str, list[int]]:
    """Run each variant ``block`` times per round, rotating the order every round.

    Samples from the same round and position line up across variants (used to
    sum ``direct`` + ``socket floor`` into ``floor``).
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    out: dict[str, list[int]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = variants[name]
            samples = out[name]
            for _ in range(block):
                samples.append(fn())
    return out


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


def _serve(kids: list[Child], peer: Peer, mode: str, *extra: str, handshake: bool) -> None:
    kids.append(spawn(mode, ["-m", "benchmarks.servers", mode, "--endpoint", peer.arg, *extra]))
    peer.accept()
    if handshake:
        peer.handshake()


@contextlib.contextmanager
def _in_process_bridge(peer: Peer, reader: str) -> Iterator[None]:
    """A CardBridge with the real PC/SC card side on a thread of this process."""
    from ccidbridge.card.pcsc import PcscCard
    from ccidbridge.runtime.bridge import CardBridge
    from ccidbridge.spec import ReaderSpec, ServedCard

    served = ServedCard("inproc", peer.endpoint, ReaderSpec(name=reader))
    loop = asyncio.new_event_loop()
    bridge = CardBridge(served, PcscCard(served.reader), logging.getLogger("bench.inproc"))
    task = loop.create_task(bridge.run())

    def main() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(BaseException):
            loop.run_until_complete(task)

    thread = threading.Thread(target=main, name="inproc-bridge", daemon=True)
    thread.start()
    try:
        peer.accept()
        peer.handshake()
        yield
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(5)
        loop.close()


def _timed(peer: Peer, frame: bytes) -> Callable[[], int]:
    rt = peer.roundtrip
    return lambda: rt(frame)


def with_floor(direct: list[int], socket_floor: list[int]) -> list[int]:
    return [a + b for a, b in zip(direct, socket_floor, strict=False)]


def measure_apdu(cards: dict[str, str], sock: str, rounds: int, block: int) -> dict[str, object]:
    """Item 1 for one card kind and socket type; ``cards`` maps role -> reader."""
    frame = apdu_frame(GET_CHALLENGE)
    with workdir() as tmp, children() as kids, contextlib.ExitStack() as closers:
        names = ("bridged", "socket floor", "relay", "session relay", "bridged, card on loop")
        peers = {name: Peer(sock, tmp, name.replace(" ", "-")) for name in names}
        for p in peers.values():
            closers.callback(p.close)
        _serve(kids, peers["bridged"], "bridge", "--reader", cards["bridge"], handshake=True)
        _serve(kids, peers["socket floor"], "floor", handshake=False)
        _serve(kids, peers["relay"], "relay", "--reader", cards["relay"], handshake=False)
        _serve(
            kids,
            peers["session relay"],
            "session-relay",
            "--reader",
            cards["session relay"],
            handshake=True,
        )
        _serve(
            kids,
            peers["bridged, card on loop"],
            "bridge",
            "--reader",
            f"inline:{cards['card on loop']}",
            handshake=True,
        )
        inproc = Peer(sock, tmp, "inproc")
        closers.callback(inproc.close)
        closers.enter_context(_in_process_bridge(inproc, cards["in-process"]))
        direct, close_direct = _direct(cards["direct"])
        closers.callback(close_direct)
        variants = {name: _timed(p, frame) for name, p in peers.items()}
        variants["direct"] = direct
        variants["bridged in-process"] = _timed(inproc, frame)
        raw = interleave(variants, rounds, block)
        for name, p in (*peers.items(), ("bridged in-process", inproc)):
            _check_9000(p, name)
    raw["floor"] = with_floor(raw["direct"], raw["socket floor"])
    stats = {name: summary(v) for name, v in raw.items()}
    b, f, d, r = stats["bridged"], stats["floor"], stats["direct"], stats["relay"]
    sr = stats["session relay"]
    ratios = {
        "bridged/direct median": b["median_us"] / d["median_us"],
        "bridged/direct p99": b["p99_us"] / d["p99_us"],
        "bridged/floor median": b["median_us"] / f["median_us"],
        "bridged/floor p99": b["p99_us"] / f["p99_us"],
        "relay/floor median": r["median_us"] / f["median_us"],
        "relay/floor p99": r["p99_us"] / f["p99_us"],
        "bridged/relay median": b["median_us"] / r["median_us"],
        "session relay/floor median": sr["median_us"] / f["median_us"],
        "session relay/floor p99": sr["p99_us"] / f["p99_us"],
        "in-process/floor median": stats["bridged in-process"]["median_us"] / f["median_us"],
        "card on loop/floor median": stats["bridged, card on loop"]["median_us"] / f["median_us"],
    }
    return {"stats": stats, "ratios": ratios}


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
    rounds: int = 10, block: int = 300, modes: tuple[int | None, ...] = (0, None)
) -> dict[str, object]:
    """Item 1 for each scheduling mode (pinned to CPU 0, free), card kind and socket type.

    Free mode uses 3x as many rounds of a third the size, so the scheduler's
    whims (see :func:`benchmarks.common.pinned`) are shared out more evenly.
    """
    from lab.pcsc import PcscStack

    results: dict[str, object] = {}
    for cpu in modes:
        r, b = (rounds, block) if cpu is not None else (rounds * 3, max(1, block // 3))
        with pinned(cpu) as mode, PcscStack(3, debug=False) as stack:
            for kind in CARDS:
                roles = ("bridge", "direct", "relay", "session relay", "in-process", "card on loop")
                readers, handles = insert_cards(stack, kind, len(roles))
                try:
                    cards = dict(zip(roles, readers, strict=True))
                    for sock in SOCKETS:
                        results[f"{mode} {kind} {sock}"] = measure_apdu(cards, sock, r, b)
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
