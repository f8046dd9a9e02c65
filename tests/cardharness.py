"""Drive a card side the way a bridge's APDU thread does, and record what it says.

:class:`DrivenCard` runs one owner thread for a :class:`CardSide`: it waits
for the card side's wake-ups, its due time or a request from the test, then
calls ``reports()`` / ``transmit()`` / ``revive()`` on that one thread, as
runtime/bridge.py does.  Everything the card side reports (and every log line
it writes) is recorded in order as ``(kind, *args)``: ``("inserted", atr,
reader)``, ``("removed", reason)``, ``("done", seq, response, error)``,
``("notice", message, level)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ccidbridge.card.base import CardSide, Inserted, Removed, TransmitFailed

WAIT = 5.0  # s: generous next to pcscd's 400 ms vpcd poll


class Record(logging.Handler):
    """The calls, in order; waits with timeouts."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()

    def add(self, *call: Any) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def emit(self, record: logging.LogRecord) -> None:
        self.add("notice", record.getMessage(), record.levelno)

    def mark(self) -> int:
        with self._cond:
            return len(self.calls)

    def of(self, kind: str, since: int = 0) -> list[tuple[Any, ...]]:
        with self._cond:
            return [c for c in self.calls[since:] if c[0] == kind]

    def notices(self, text: str) -> list[str]:
        return [c[1] for c in self.of("notice") if text in c[1]]

    def wait(
        self,
        kind: str,
        since: int = 0,
        pred: Callable[[tuple[Any, ...]], bool] = lambda c: True,
        timeout: float = WAIT,
    ) -> tuple[Any, ...]:
        """The first ``kind`` call at index >= ``since`` matching ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for c in self.calls[since:]:
                    if c[0] == kind and pred(c):
                        return c
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kind!r} within {timeout} s; calls: {self.calls}")
                self._cond.wait(left)

    def quiet(self, kind: str, since: int, timeout: float) -> bool:
        """True if no ``kind`` call arrives within ``timeout`` (for 'must not happen')."""
        try:
            self.wait(kind, since, timeout=timeout)
        except AssertionError:
            return True
        return False


class DrivenCard:
    _count = 0

    def __init__(self, make: Callable[[logging.Logger], CardSide]) -> None:
        DrivenCard._count += 1
        self.log = logging.getLogger(f"ccidbridge.cardtest{DrivenCard._count}")
        self.log.setLevel(logging.DEBUG)
        self.log.propagate = False
        self.record = Record()
        self.log.addHandler(self.record)
        self.card = make(self.log)
        self._cond = threading.Condition()
        self._woken = False
        self._requests: list[tuple[str, Any]] = []
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name="cardtest-owner", daemon=True)
        self.thread.start()

    # -- the test's side ---------------------------------------------------------------

    def transmit(self, seq: int, apdu: bytes | str) -> None:
        """Queue ``apdu``; its answer is recorded as ``("done", seq, response, error)``."""
        self._request("transmit", (seq, bytes.fromhex(apdu) if isinstance(apdu, str) else apdu))

    def send(self, seq: int, apdu: bytes | str) -> tuple[Any, ...]:
        """transmit() and wait for its answer."""
        mark = self.record.mark()
        self.transmit(seq, apdu)
        return self.record.wait("done", mark, lambda c: c[1] == seq)

    def revive(self, failed: bool) -> None:
        self._request("revive", failed)

    def stop(self) -> None:
        """Stop the card side on its owner thread (after what is queued)."""
        self._request("stop", None)
        self.thread.join(WAIT)

    # -- the owner thread --------------------------------------------------------------

    def _request(self, what: str, arg: Any) -> None:
        with self._cond:
            self._requests.append((what, arg))
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _run(self) -> None:
        card = self.card
        card.start(self._wake)
        while True:
            with self._cond:
                while not self._woken and not self._requests:
                    due = card.next_due()
                    timeout = None if due is None else max(0.0, due - time.monotonic())
                    if timeout == 0.0 or not self._cond.wait(timeout):
                        break
                self._woken = False
                requests, self._requests = self._requests, []
            self._reports()
            for what, arg in requests:
                if what == "stop":
                    card.stop()
                    self.record.add("stopped")
                    return
                if what == "revive":
                    card.revive(arg)
                elif what == "transmit":
                    seq, apdu = arg
                    try:
                        self.record.add("done", seq, card.transmit(apdu), None)
                    except TransmitFailed as exc:
                        self.record.add("done", seq, None, str(exc))
                self._reports()

    def _reports(self) -> None:
        for report in self.card.reports(time.monotonic()):
            if isinstance(report, Inserted):
                self.record.add("inserted", report.atr, report.reader)
            elif isinstance(report, Removed):
                self.record.add("removed", report.reason)
