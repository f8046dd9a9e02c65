"""What the gate (policy + PIN guard) and the trace add to each guest APDU.

``python -m benchmarks.safety [--quick]``: the per-APDU cost, in nanoseconds,
of what CardBridge._transmit calls around the card: ``Gate.check`` before and
``Gate.answered`` after (default config: the guard on, no policy rules; and
with a six-rule policy), and ``CardTrace.exchange`` writing to a file in a
temporary directory, at ``-v`` (no data) and ``-vv``.  Each figure is the median
of several rounds, minus the cost of the same loop calling two empty functions.
The card round trip these are added to is about 0.2-0.5 ms on pcscd + vpcd
(docs/benchmarks.md), so 1 µs is 0.2-0.5 %.

``--end-to-end`` also times whole guest round trips through a real CardBridge
(the QEMU twin on a Unix socket, an instant card), interleaved in rounds:
the gate as shipped, the gate replaced by a no-op (the path before it
existed), and the gate plus ``--trace`` to a file; median µs per APDU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ccidbridge.config import loads
from ccidbridge.protocol.gate import Gate
from ccidbridge.runtime.trace import TraceFile
from ccidbridge.spec import ApduPolicy, PinGuardSpec

READ = bytes.fromhex("00B0000010")
READ_ANSWER = bytes(16) + b"\x90\x00"
SELECT = bytes.fromhex("00A4040C06D27600012401")
VERIFY = bytes.fromhex("0020008106313233343536")
OK = b"\x90\x00"
RULES = """<ccidbridge><smartcard mode='passthrough' type='unix'>
<source mode='bind' path='/run/x.sock'/><policy>
<deny ins='E6 44'/><deny ins='2C 2D'/><deny aid='D27600012401' ins='47 DA DB'/>
<allow aid='A000000308' ins='47' p2='9A'/><deny aid='A000000308' ins='47'/>
<deny cla='80/F0' ins='E0-EF'/></policy></smartcard></ccidbridge>"""


def _policy() -> ApduPolicy:
    (card,) = loads(RULES).served_cards()
    return card.policy


def _per_call(body: Callable[[], None], n: int, rounds: int) -> float:
    """Median ns per call of ``body`` (which runs one exchange)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            body()
        out.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(out)


def measure(n: int = 200_000, rounds: int = 7) -> dict[str, float]:
    def nothing(_a: bytes, _b: bytes | None = None) -> None:
        return None

    def empty() -> None:
        nothing(READ)
        nothing(READ, READ_ANSWER)

    floor = _per_call(empty, n, rounds)
    results: dict[str, float] = {}

    def gate_case(name: str, gate: Gate, apdu: bytes, answer: bytes) -> None:
        check, answered = gate.check, gate.answered

        def body() -> None:
            check(apdu)
            answered(apdu, answer)

        results[name] = _per_call(body, n, rounds) - floor

    default = Gate(PinGuardSpec(), ApduPolicy())
    gate_case("gate default, READ BINARY", default, READ, READ_ANSWER)
    gate_case("gate default, SELECT", default, SELECT, OK)
    gate_case("gate default, VERIFY", Gate(PinGuardSpec(), ApduPolicy()), VERIFY, b"\x63\xc2")
    gate_case("gate 6 rules, READ BINARY", Gate(PinGuardSpec(), _policy()), READ, READ_ANSWER)
    with tempfile.TemporaryDirectory() as d:
        for data, name in ((False, "trace -v, READ BINARY"), (True, "trace -vv, READ BINARY")):
            tf = TraceFile(str(Path(d) / f"t{int(data)}.jsonl"), 1 << 40, with_data=data)
            exchange = tf.card("vm.xml:3 smartcard0").exchange

            def body(exchange: Callable[..., None] = exchange,
                     started: float = time.monotonic()) -> None:
                exchange(READ, READ_ANSWER, started)

            results[name] = _per_call(body, n // 4, rounds) - floor
            tf.close()
    return results


class _NoGate:
    """The path before the gate existed: nothing checked, nothing learned."""

    def check(self, apdu: bytes) -> None:
        return None

    def answered(self, apdu: bytes, response: bytes) -> None:
        return None

    def forget(self) -> None:
        return None


def end_to_end(n: int = 2000, rounds: int = 5) -> dict[str, float]:
    from ccidbridge.runtime.bridge import CardBridge
    from ccidbridge.spec import ReaderSpec, ServedCard
    from lab.device_peer import DevicePeer
    from lab.instant_card import InstantCard

    samples: dict[str, list[float]] = {"bridge, gate as shipped": [], "bridge, no gate": [],
                                       "bridge, gate + --trace": []}
    with tempfile.TemporaryDirectory() as d:
        tf = TraceFile(str(Path(d) / "trace.jsonl"), 1 << 40)
        for _ in range(rounds):
            for name in samples:
                with DevicePeer("unix", path=str(Path(d) / "q.sock")) as peer:
                    served = ServedCard(label="bench", endpoint=peer.endpoint, reader=ReaderSpec())
                    tracer = tf.card("bench") if "trace" in name else None
                    bridge = CardBridge(served, InstantCard(), tracer=tracer)
                    if name.endswith("no gate"):
                        bridge._gate = _NoGate()  # type: ignore[assignment]
                    bridge.start()
                    try:
                        peer.wait_card(True)
                        for _ in range(200):
                            peer.guest(READ)
                        t0 = time.perf_counter_ns()
                        for _ in range(n):
                            peer.guest(READ)
                        samples[name].append((time.perf_counter_ns() - t0) / n / 1000)
                    finally:
                        bridge.stop()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(d) / "q.sock")
        tf.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.safety")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--end-to-end", action="store_true")
    args = p.parse_args()
    results = measure(20_000, 3) if args.quick else measure()
    for name, ns in results.items():
        print(f"{name:32s} {ns:8.0f} ns per APDU")
    if args.end_to_end:
        e2e = end_to_end(500, 3) if args.quick else end_to_end()
        for name, us in e2e.items():
            print(f"{name:32s} {us:8.1f} µs per APDU (median of rounds)")
        results.update({k: v * 1000 for k, v in e2e.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
