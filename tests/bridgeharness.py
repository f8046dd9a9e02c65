"""Run a CardBridge in this process, as ``ccidbridge run`` does.

Tests drive the outside world (QEMU, pcscd, peers) from the test thread and
look at the bridge through its thread-safe events and its captured log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ccidbridge.card.base import CardSide
from ccidbridge.runtime.bridge import CardBridge
from ccidbridge.spec import Endpoint, ReaderSpec, ServedCard


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def served_card(
    endpoint: Endpoint, reader: ReaderSpec | None = None, label: str = "t"
) -> ServedCard:
    return ServedCard(label=label, endpoint=endpoint, reader=reader or ReaderSpec())


class RunningBridge:
    """A started CardBridge whose log is captured (at DEBUG, whatever ``trace``)."""

    _count = 0

    def __init__(self, served: ServedCard, card: CardSide, trace: int = 0) -> None:
        RunningBridge._count += 1
        self.log = logging.getLogger(f"ccidbridge.test{RunningBridge._count}")
        self.log.setLevel(logging.DEBUG)
        self.capture = _Capture()
        self.log.addHandler(self.capture)
        self.bridge = CardBridge(served, card, self.log, trace=trace)
        self.bridge.start()

    def wait(self, predicate: Callable[[CardBridge], bool], timeout: float = 5.0) -> None:
        """Until ``predicate(bridge)`` holds (it reads only thread-safe state)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.bridge):
            if time.monotonic() > deadline:
                raise AssertionError("bridge condition not reached; log:\n" + self.text())
            time.sleep(0.005)

    def wait_synced(self, timeout: float = 5.0) -> None:
        if not self.bridge.synchronized.wait(timeout):
            raise AssertionError("the bridge did not synchronize; log:\n" + self.text())

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.capture.lines):
                if needle in line:
                    return line
            time.sleep(0.01)
        raise AssertionError(f"no log line with {needle!r}; log:\n" + self.text())

    def text(self) -> str:
        return "\n".join(self.capture.lines)

    def stop(self, graceful: bool = True) -> None:
        if not self.bridge.finished.is_set():
            if graceful:
                self.bridge.stop()
            else:
                self.bridge.kill()
            assert self.bridge.finished.wait(5), "the bridge did not stop; log:\n" + self.text()
        self.log.removeHandler(self.capture)

    def __enter__(self) -> RunningBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
