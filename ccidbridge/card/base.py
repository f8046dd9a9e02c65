"""The interface between a card bridge and its card side.

Threading contract (one owner): a card side is driven by its bridge's APDU
thread, which calls :meth:`CardSide.reports` and :meth:`CardSide.transmit`
synchronously — SCardTransmit runs on that thread, with no hand-off.  Watchers
the card side runs on threads of its own (the reader monitor) never touch its
state: they post into a thread-safe inbox and call ``wake()``, after which the
owner calls :meth:`reports`.

A card that stops answering keeps its owner stuck in a card call: the
bridge then serves QEMU from a new thread without touching the card side,
and the card side goes back to the bridge's current thread only when the
stuck call returns (:meth:`CardSide.revive`).  So at any moment exactly one
thread uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Inserted:
    """A card is ready: found at start, inserted, reset, or back after a failure."""

    atr: bytes
    reader: str
    protocol: int | None = None  # what the host talks to it with: 0 (T=0), 1 (T=1), None


@dataclass(frozen=True, slots=True)
class Removed:
    """The card can no longer be served; ``reason`` is one line for the log."""

    reason: str


CardReport = Inserted | Removed


class TransmitFailed(Exception):
    """The APDU did not reach the card or its answer did not come back.

    ``str()`` is one line for the log, never the APDU's bytes.  What the
    failure means for the card (removed, reset) comes from the next
    :meth:`CardSide.reports`.
    """


class CardSide(Protocol):
    def start(self, wake: Callable[[], None]) -> None:
        """Begin watching; call ``wake()`` (from any thread) when :meth:`reports`
        has something to do."""

    def reports(self, now: float) -> list[CardReport]:
        """Owner thread: act on what the watchers posted and on what is due
        (retries), and say what changed."""

    def next_due(self) -> float | None:
        """The ``time.monotonic()`` at which :meth:`reports` wants to run again."""

    def transmit(self, apdu: bytes) -> bytes:
        """Owner thread: send ``apdu``, return the answer (SW1 SW2 included).
        Blocks as long as the card takes; raises :class:`TransmitFailed`."""

    def revive(self, failed: bool) -> None:
        """Owner thread: a card call the bridge had given up on (the card did not
        answer within the timeout, and the guest was told the card is gone) has
        returned, ``failed`` if without an answer.  Report the card again if it
        answers now (a mute card is reset first)."""

    def stop(self) -> None:
        """Release the card (SCARD_LEAVE_CARD) and end every watcher; returns
        promptly even when a call is stuck in a hung card."""
