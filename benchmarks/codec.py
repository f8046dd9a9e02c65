"""Codec throughput: ccidbridge's codec against a plain ``struct`` codec.

A "typical exchange" is what one guest APDU costs the bridge on the wire:
parse one incoming VSC_APDU frame (a 13-byte SELECT) and build one outgoing
VSC_APDU response (a 10-byte answer + 9000).  Measured in the same process,
interleaved in rounds, as messages per second; the ratio is what counts.

Variants:
- ``ccidbridge``: the codec the bridge uses (FrameDecoder + decode, encode)
- ``construct compiled`` / ``construct interpreted``: whole frames through
  construct's compiled and plain parsers/builders
- ``struct``: the floor, a hand-written struct codec with no validation
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable

from construct import Bytes, Int32ub, Struct, this

from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.messages import Apdu, decode, encode

COMMAND = bytes.fromhex("00000007000000000000000d00a4040007a000000003000000")
RESPONSE = Apdu(bytes(range(10)) + b"\x90\x00")
N = 20_000
ROUNDS = 5

_Frame = Struct("type" / Int32ub, "reader_id" / Int32ub, "length" / Int32ub,
                "payload" / Bytes(this.length))  # fmt: skip
_FrameC = _Frame.compile()
_hdr = struct.Struct(">III")


def ours_parse() -> None:
    decoder = FrameDecoder()
    feed = decoder.feed
    for _ in range(N):
        for raw in feed(COMMAND):
            decode(raw)


def ours_build() -> None:
    for _ in range(N):
        encode(RESPONSE)


def construct_parse(codec: Struct) -> Callable[[], None]:
    def run() -> None:
        parse = codec.parse
        for _ in range(N):
            parse(COMMAND)

    return run


def construct_build(codec: Struct) -> Callable[[], None]:
    fields = {"type": 7, "reader_id": 0, "length": len(RESPONSE.data), "payload": RESPONSE.data}

    def run() -> None:
        build = codec.build
        for _ in range(N):
            build(fields)

    return run


def struct_parse() -> None:
    unpack = _hdr.unpack_from
    for _ in range(N):
        _t, _r, length = unpack(COMMAND)
        COMMAND[12 : 12 + length]


def struct_build() -> None:
    pack = _hdr.pack
    data = RESPONSE.data
    for _ in range(N):
        pack(7, 0, len(data)) + data


VARIANTS: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
    "ccidbridge": (ours_parse, ours_build),
    "construct compiled": (construct_parse(_FrameC), construct_build(_FrameC)),
    "construct interpreted": (construct_parse(_Frame), construct_build(_Frame)),
    "struct (floor)": (struct_parse, struct_build),
}


def measure() -> dict[str, dict[str, float]]:
    rates: dict[str, dict[str, list[float]]] = {
        name: {"parse": [], "build": []} for name in VARIANTS
    }
    for _ in range(ROUNDS):  # interleaved, so drift hits every variant alike
        for name, (parse, build) in VARIANTS.items():
            for kind, fn in (("parse", parse), ("build", build)):
                t0 = time.perf_counter()
                fn()
                rates[name][kind].append(N / (time.perf_counter() - t0))
    return {
        name: {kind: statistics.median(values) for kind, values in kinds.items()}
        for name, kinds in rates.items()
    }


def report(results: dict[str, dict[str, float]]) -> list[str]:
    floor = results["struct (floor)"]
    lines = [
        f"{'codec':<24}{'parse msg/s':>14}{'build msg/s':>14}{'parse/floor':>13}{'build/floor':>13}"
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<24}{r['parse']:>14,.0f}{r['build']:>14,.0f}"
            f"{r['parse'] / floor['parse']:>13.2f}{r['build'] / floor['build']:>13.2f}"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(report(measure())))
