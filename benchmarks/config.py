"""Config loading time against config size, 1 KiB to 1 MiB (the cap): it must be linear.

``python -m benchmarks.config`` (or the ``config`` item of ``python -m
benchmarks``).  For each size a config of that many bytes is written to a
file and loaded with ``ccidbridge.config.load`` (read, parse, check, lay out,
resolve what ``run`` serves), the median of several runs.  Shapes:

* ``cards``: passthrough smartcards on unix sockets, one per line (every card
  after the first gets its own ccid controller, as libvirt needs);
* ``multi-line``: the same cards with every attribute on its own line (the
  line lookup of document.py works hardest);
* ``comments``: one card, the rest a long comment on the card's line.

Linear means the time per KiB stays flat from 16 KiB on (below that the
fixed cost of a load dominates).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ccidbridge.config import load
from ccidbridge.config.document import MAX_BYTES

SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, MAX_BYTES - 512)
RUNS = 5


def _card(i: int, sep: str) -> str:
    return (f"<smartcard{sep}mode='passthrough'{sep}type='unix'><source{sep}mode='connect'{sep}"
            f"path='/run/ccidbridge/card{i}.sock'/><reader{sep}match='Virtual*'{sep}"
            f"share='shared'/></smartcard>\n")


def _cards(size: int, sep: str) -> bytes:
    parts, total, i = ["<ccidbridge>\n"], 13, 0
    while True:
        card = _card(i, sep)
        if total + len(card) + 14 > size:
            break
        parts.append(card)
        total += len(card)
        i += 1
    return ("".join(parts) + "</ccidbridge>\n").encode()


def _comments(size: int) -> bytes:
    head = "<ccidbridge>" + _card(0, " ").rstrip("\n") + "<!-- "
    tail = " --></ccidbridge>\n"
    return (head + "x" * (size - len(head) - len(tail)) + tail).encode()


SHAPES: dict[str, Callable[[int], bytes]] = {
    "cards": lambda size: _cards(size, " "),
    "multi-line": lambda size: _cards(size, "\n  "),
    "comments": _comments,
}


def measure(runs: int = RUNS) -> dict[str, dict[str, float]]:
    """``{shape: {size: median seconds}}`` (sizes as strings, for JSON)."""
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, make in SHAPES.items():
            out[shape] = {}
            for size in SIZES:
                path = Path(tmp) / f"{shape}-{size}.xml"
                path.write_bytes(make(size))
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    load(str(path))
                    times.append(time.perf_counter() - t0)
                out[shape][str(path.stat().st_size)] = statistics.median(times)
    return out


def report(results: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'shape':<12}{'bytes':>10}{'load ms':>10}{'µs/KiB':>9}"]
    for shape, by_size in results.items():
        for size, seconds in by_size.items():
            per_kib = seconds * 1e6 / (int(size) / 1024)
            lines.append(f"{shape:<12}{int(size):>10,}{seconds * 1e3:>10.2f}{per_kib:>9.1f}")
    return lines


if __name__ == "__main__":
    print("\n".join(report(measure(int(sys.argv[1]) if len(sys.argv) > 1 else RUNS))))
