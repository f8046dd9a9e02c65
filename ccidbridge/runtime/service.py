"""Every served card of every config, in one process.

Each card is its own :class:`~ccidbridge.runtime.bridge.CardBridge` with its
own threads and card side: one card's failure (its reader, its socket, a bug)
is logged and that card is started again after a pause; the others never
notice.  SIGINT/SIGTERM stop all cards cleanly (CardRemove + ReaderRemove to
each QEMU, acks awaited briefly).

The service's own state belongs to the thread that calls :meth:`Service.run`;
bridges and signal handlers only set ``_changed``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from ccidbridge.card.base import CardSide
from ccidbridge.runtime.bridge import SHUTDOWN_ACK_TIMEOUT, CardBridge
from ccidbridge.runtime.trace import TraceFile
from ccidbridge.runtime.transport import TransportError
from ccidbridge.spec import ServedCard

log = logging.getLogger("ccidbridge")

_Handler = Callable[[int, FrameType | None], object] | int | None

#: Pause before a card whose bridge failed unexpectedly is started again.
RESTART_PAUSE = 1.0


class CardLog(logging.LoggerAdapter[logging.Logger]):
    """Every line about one card starts with its label (``vm.xml:3 smartcard0``)."""

    def process(self, msg: object, kwargs: object) -> tuple[str, object]:  # type: ignore[override]
        assert self.extra is not None
        return f"{self.extra['label']}: {msg}", kwargs


def default_card_factory(served: ServedCard, card_log: CardLog) -> CardSide:
    from ccidbridge.card.pcsc import PcscCard

    return PcscCard(served.reader, card_log)


class Service:
    def __init__(
        self,
        cards: list[ServedCard],
        card_factory: Callable[[ServedCard, CardLog], CardSide] = default_card_factory,
        trace: int = 0,
        trace_file: TraceFile | None = None,
    ) -> None:
        self.cards = cards
        self.card_factory = card_factory
        self.trace = trace
        self.trace_file = trace_file  # run --trace: every card's APDUs (runtime/trace.py)
        self.bridges: dict[str, CardBridge] = {}
        #: label -> why it cannot be served at all (a configuration problem)
        self.failed: dict[str, str] = {}
        self._changed = threading.Event()
        self._stop = False

    def request_stop(self) -> None:
        """From any thread (or a signal handler): stop every card and return from run()."""
        self._stop = True
        self._changed.set()

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM (when called on the main thread) or
        :meth:`request_stop`; exit status 1 if no card could be served at all."""
        handlers = self._install_signals()
        restart_at: dict[str, float] = {}
        try:
            for served in self.cards:
                log.info("serving %s on %s", served.label, served.endpoint.describe())
                self._start(served)
            while not self._stop:
                now = time.monotonic()
                for served in self.cards:
                    label = served.label
                    bridge = self.bridges.get(label)
                    if bridge is not None and bridge.finished.is_set() and label not in restart_at:
                        restart_at[label] = now + RESTART_PAUSE
                    if label in restart_at and now >= restart_at[label]:
                        del restart_at[label]
                        self._start(served)
                if len(self.failed) == len(self.cards):
                    break
                timeout = min(restart_at.values(), default=now + 3600) - now
                self._changed.wait(max(0.0, timeout))
                self._changed.clear()
        finally:
            self._restore_signals(handlers)
        log.info("stopping: telling QEMU the cards are gone")
        live = [b for b in self.bridges.values() if not b.finished.is_set()]
        stoppers = [threading.Thread(target=b.stop, daemon=True) for b in live]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(SHUTDOWN_ACK_TIMEOUT + 1.5)
        return 1 if self.failed and len(self.failed) == len(self.cards) else 0

    def _start(self, served: ServedCard) -> None:
        clog = CardLog(logging.getLogger("ccidbridge.card"), {"label": served.label})
        tracer = self.trace_file.card(served.label) if self.trace_file is not None else None
        bridge = CardBridge(served, self.card_factory(served, clog), clog, trace=self.trace,
                            tracer=tracer)
        try:
            bridge.start()
        except TransportError as exc:
            clog.error("%s", exc)
            self.failed[served.label] = str(exc)
            self.bridges.pop(served.label, None)
            return  # a configuration problem: retrying would say the same
        self.bridges[served.label] = bridge
        threading.Thread(target=self._watch_bridge, args=(bridge,), daemon=True).start()

    def _watch_bridge(self, bridge: CardBridge) -> None:
        bridge.finished.wait()
        if bridge.failure is not None and not self._stop:
            bridge.log.error("restarting this card's bridge in %gs", RESTART_PAUSE)
        self._changed.set()

    def _install_signals(self) -> dict[int, _Handler]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, _Handler] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda *_: self.request_stop())
        return old

    @staticmethod
    def _restore_signals(handlers: dict[int, _Handler]) -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
