"""The interface between the bridge runtime and a card side.

Threading contract: a card side does its blocking work on its own threads.
Its methods return at once.  It reports through a :class:`CardSink`, whose
methods it may call from any of its threads; the runtime's sink marshals each
call onto the event loop.
"""

from __future__ import annotations

from typing import Protocol


class CardSink(Protocol):
    """What a card side reports.  Callable from any thread."""

    def card_inserted(self, atr: bytes, reader: str) -> None:
        """A card is ready to serve APDUs: found at start, inserted, reset, or
        back after a failure.  Called again (same or new ATR) after a reset."""

    def card_removed(self, reason: str) -> None:
        """The card can no longer be served: removed, reader gone, pcscd gone,
        card failed.  ``reason`` is one line for the log."""

    def apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
        """The answer to ``transmit(seq, ...)``: ``response`` (with SW1 SW2)
        or ``None`` with ``error`` saying why it failed."""

    def notice(self, message: str, level: int) -> None:
        """A log line (``logging`` level) about the host side, e.g. "reader X
        not found; waiting".  The card side says each condition once, not per
        retry."""


class CardSide(Protocol):
    def start(self, sink: CardSink) -> None:
        """Begin watching for the card; report through ``sink``."""

    def transmit(self, seq: int, apdu: bytes) -> None:
        """Queue ``apdu`` for the card; answer with ``sink.apdu_done(seq, ...)``
        exactly once.  APDUs are carried out one at a time, in order."""

    def recheck(self) -> None:
        """The runtime gave up on a card that stopped answering (APDU timeout)
        and reported it removed.  When the card answers again, report
        ``card_inserted`` again."""

    def stop(self) -> None:
        """Release the card (SCARD_LEAVE_CARD) and end every thread; no sink
        call after this returns.  Must return promptly even if a transmit is
        stuck in a hung card (abandon that thread: it is a daemon)."""
