"""A card side with no card behind it: every APDU is answered at once.

Used to measure what the bridge itself costs (benchmarks) and in runtime
tests that need a card without pcscd.
"""

from __future__ import annotations

from collections.abc import Callable

from ccidbridge.card.base import CardReport, Inserted

DEFAULT_ATR = bytes.fromhex("3B8F8001804F0CA0000003060300030000000068")


def ok_9000(apdu: bytes) -> bytes:
    return b"\x90\x00"


class InstantCard:
    """Answers every APDU synchronously with ``respond(apdu)``."""

    def __init__(
        self, atr: bytes = DEFAULT_ATR, respond: Callable[[bytes], bytes] = ok_9000
    ) -> None:
        self.atr = atr
        self.respond = respond
        self._out: list[CardReport] = []

    def start(self, wake: Callable[[], None]) -> None:
        self._out.append(Inserted(self.atr, "instant", 0))
        wake()

    def reports(self, now: float) -> list[CardReport]:
        out, self._out = self._out, []
        return out

    def next_due(self) -> float | None:
        return None

    def transmit(self, apdu: bytes) -> bytes:
        return self.respond(apdu)

    def revive(self, failed: bool) -> None:
        self._out.append(Inserted(self.atr, "instant", 0))

    def stop(self) -> None:
        pass
