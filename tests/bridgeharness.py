"""Run a CardBridge on its own event loop in a background thread.

Tests drive the outside world (QEMU, pcscd, peers) from the test thread and
look at the bridge through thread-safe waits.  Log records are captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
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
    _count = 0

    def __init__(self, served: ServedCard, card: CardSide, trace: int = 2) -> None:
        RunningBridge._count += 1
        self.log = logging.getLogger(f"ccidbridge.test{RunningBridge._count}")
        self.log.setLevel(logging.DEBUG)
        self.capture = _Capture()
        self.log.addHandler(self.capture)
        self.loop = asyncio.new_event_loop()
        self.bridge: CardBridge | None = None
        self._task: asyncio.Task | None = None
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.bridge = CardBridge(served, card, self.log, trace=trace)
            self._task = self.loop.create_task(self.bridge.run())
            ready.set()
            with contextlib.suppress(BaseException):  # cancelled at stop
                self.loop.run_until_complete(self._task)

        self.thread = threading.Thread(target=main, name="bridge", daemon=True)
        self.thread.start()
        ready.wait(5)

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the bridge's loop and return its result."""
        done = threading.Event()
        box: list[object] = []

        def run() -> None:
            box.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(5)
        return box[0]

    def wait(self, predicate: Callable[[CardBridge], bool], timeout: float = 5.0) -> float:
        """Poll ``predicate(bridge)`` on the loop; return the seconds it took."""
        t0 = time.monotonic()
        while True:
            if self.call(lambda: predicate(self.bridge)):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError("bridge condition not reached; log:\n" + self.text())
            time.sleep(0.005)

    def wait_synced(self, timeout: float = 5.0) -> float:
        return self.wait(lambda b: b.synchronized.is_set(), timeout)

    def wait_log(self, needle: str, timeout: float = 5.0) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for line in list(self.capture.lines):
                if needle in line:
                    return line
            time.sleep(0.01)
        raise AssertionError(f"no log line with {needle!r}; log:\n" + self.text())

    def text(self) -> str:
        return "\n".join(self.capture.lines)

    def stop(self, graceful: bool = True) -> None:
        if self.thread.is_alive():
            running = self._task is not None and not self._task.done()
            if graceful and running and self.bridge is not None:
                fut = asyncio.run_coroutine_threadsafe(self.bridge.stop(), self.loop)
                fut.result(5)
            if self._task is not None:
                self.loop.call_soon_threadsafe(self._task.cancel)
            self.thread.join(5)
        self.log.removeHandler(self.capture)

    def __enter__(self) -> RunningBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
