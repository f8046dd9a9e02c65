"""The frames observed on real QEMU 7.2 (protocol/vectors/qemu-7.2.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VECTORS = Path(__file__).resolve().parent.parent / "protocol" / "vectors" / "qemu-7.2.json"


@dataclass(frozen=True)
class Vector:
    name: str
    direction: str
    frame: bytes
    meaning: str
    reply: bytes | None
    codec_error: str | None

    def __str__(self) -> str:
        return self.name


def _hex(text: str | None) -> bytes | None:
    return None if text is None else bytes.fromhex(text.replace(" ", ""))


def load(layer: str = "vscard") -> list[Vector]:
    data = json.loads(VECTORS.read_text())
    return [
        Vector(
            v["name"],
            v["direction"],
            _hex(v["hex"]),
            v["meaning"],
            _hex(v.get("reply")),
            v.get("codec_error"),
        )
        for v in data[layer]
    ]
