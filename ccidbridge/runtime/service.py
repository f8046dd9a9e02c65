"""Every served card of every config, in one process.

Each card runs as its own task with its own card side: one card's failure
(its reader, its socket, a bug) is logged and that card is restarted after a
pause; the others never notice.  SIGINT/SIGTERM stop all cards cleanly
(CardRemove + ReaderRemove to each QEMU, acks awaited briefly).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from ccidbridge.card.base import CardSide
from ccidbridge.runtime.bridge import CardBridge
from ccidbridge.runtime.transport import TransportError
from ccidbridge.spec import ServedCard

log = logging.getLogger("ccidbridge")

#: Pause before a card whose bridge failed unexpectedly is started again.
RESTART_PAUSE = 1.0


class CardLog(logging.LoggerAdapter):
    """Every line about one card starts with its label (``vm.xml:3 smartcard0``)."""

    def process(self, msg: object, kwargs: dict) -> tuple[str, dict]:
        return f"{self.extra['label']}: {msg}", kwargs


def default_card_factory(served: ServedCard) -> CardSide:
    from ccidbridge.card.pcsc import PcscCard

    return PcscCard(served.reader)


class Service:
    def __init__(
        self,
        cards: list[ServedCard],
        card_factory: Callable[[ServedCard], CardSide] = default_card_factory,
        trace: int = 0,
    ) -> None:
        self.trace = trace
        self.cards = cards
        self.card_factory = card_factory
        self.bridges: dict[str, CardBridge] = {}
        self._stopping = False
        self.failed: dict[str, str] = {}

    async def _serve_one(self, served: ServedCard) -> None:
        clog = CardLog(logging.getLogger("ccidbridge.card"), {"label": served.label})
        while not self._stopping:
            bridge = CardBridge(served, self.card_factory(served), clog, trace=self.trace)
            self.bridges[served.label] = bridge
            try:
                await bridge.run()
                return
            except asyncio.CancelledError:
                raise
            except TransportError as exc:
                clog.error("%s", exc)
                self.failed[served.label] = str(exc)
                return  # a configuration problem: retrying would say the same
            except Exception:
                clog.exception("this card's bridge failed; restarting it")
                await asyncio.sleep(RESTART_PAUSE)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self._serve_one(card), name=card.label) for card in self.cards]
        for card in self.cards:
            log.info("serving %s on %s", card.label, card.endpoint.describe())
        waiter = asyncio.create_task(stop.wait())
        try:
            while True:
                live = [t for t in tasks if not t.done()]
                if not live:
                    break
                done, _ = await asyncio.wait([waiter, *live], return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    break
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        self._stopping = True
        log.info("stopping: telling QEMU the cards are gone")
        await asyncio.gather(*(b.stop() for b in self.bridges.values()), return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        waiter.cancel()
        return 1 if self.failed and len(self.failed) == len(self.cards) else 0
