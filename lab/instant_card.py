"""A card side with no card behind it: every APDU is answered at once.

Used to measure what the bridge itself costs (benchmarks) and in runtime
tests that need a card without pcscd.
"""

from __future__ import annotations

from collections.abc import Callable

from ccidbridge.card.base import CardSink

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
        self._sink: CardSink | None = None

    def start(self, sink: CardSink) -> None:
        self._sink = sink
        sink.card_inserted(self.atr, "instant")

    def transmit(self, seq: int, apdu: bytes) -> None:
        assert self._sink is not None
        self._sink.apdu_done(seq, self.respond(apdu), None)

    def recheck(self) -> None:
        if self._sink is not None:
            self._sink.card_inserted(self.atr, "instant")

    def stop(self) -> None:
        self._sink = None
