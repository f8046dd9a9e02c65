"""One served card: the session, its card side and its connection to QEMU.

Everything here runs on the event loop, except the card side's own threads,
whose reports arrive through :class:`_LoopSink` (``call_soon_threadsafe``).
The socket is always drained, even while the card is busy: QEMU's chardev
writes block its main loop when the peer stops reading (qemu-passthru.md
gotcha 12).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ccidbridge.card.base import CardSide
from ccidbridge.config.model import ServedCard
from ccidbridge.protocol import events as ev
from ccidbridge.protocol.atr import hexatr
from ccidbridge.protocol.session import BridgeSession, State
from ccidbridge.runtime import apdulog
from ccidbridge.runtime.transport import Link

#: How long shutdown waits for QEMU to ack CardRemove and ReaderRemove.
SHUTDOWN_ACK_TIMEOUT = 1.0


class _LoopSink:
    """The CardSink handed to the card side: every call hops onto the loop."""

    def __init__(self, bridge: CardBridge, loop: asyncio.AbstractEventLoop) -> None:
        self._bridge = bridge
        self._call = loop.call_soon_threadsafe

    def card_inserted(self, atr: bytes, reader: str) -> None:
        self._call(self._bridge.on_card_inserted, atr, reader)

    def card_removed(self, reason: str) -> None:
        self._call(self._bridge.on_card_removed, reason)

    def apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
        self._call(self._bridge.on_apdu_done, seq, response, error)

    def notice(self, message: str, level: int) -> None:
        self._call(self._bridge.log.log, level, "%s", message)


class CardBridge:
    """Serves one passthrough smartcard until :meth:`stop`."""

    def __init__(
        self,
        served: ServedCard,
        card: CardSide,
        log: logging.Logger | None = None,
        trace: int = 0,
    ) -> None:
        """``trace``: 1 logs every APDU (command header, length, SW, time),
        2 adds the data of commands that carry no PIN (apdulog)."""
        self.served = served
        self.card = card
        self.log = log or logging.getLogger(f"ccidbridge.{served.label}")
        self.session = BridgeSession(
            reader_name=served.reader.name or served.reader.match or "ccidbridge",
            rewrite_atr=served.reader.rewrite_atr,
        )
        self.link = Link(served.endpoint, self, self.log)
        self._transport: asyncio.Transport | None = None
        self._timeout = served.reader.apdu_timeout
        self._inflight: dict[int, tuple[float, bytes, asyncio.TimerHandle]] = {}
        self._hung = False
        self._done = asyncio.Event()
        self._trace = trace >= 1
        self._trace_data = trace >= 2
        self.connected = asyncio.Event()
        self.synchronized = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or stopped; then say goodbye to QEMU."""
        self.card.start(_LoopSink(self, asyncio.get_running_loop()))
        link_task = asyncio.create_task(self.link.run(), name=f"link {self.served.label}")
        try:
            await link_task
        finally:
            link_task.cancel()
            self.card.stop()

    async def stop(self) -> None:
        """SIGINT/SIGTERM: fail pending APDUs, CardRemove + ReaderRemove, wait
        briefly for QEMU's acks, then close."""
        self.session.send(ev.Shutdown())
        self._flush()
        if self.session.state is not State.CLOSED:
            try:
                await asyncio.wait_for(self._done.wait(), SHUTDOWN_ACK_TIMEOUT)
            except TimeoutError:
                self.log.warning("QEMU did not acknowledge the shutdown in time")
        self.link.shut()

    # -- the connection (transport.Peer) ------------------------------------------

    def connection_up(self, transport: asyncio.Transport, peer: str) -> None:
        self._transport = transport
        self.log.info("connected to QEMU (%s)", peer)
        self.connected.set()
        self.session.send(ev.ConnectionOpened())
        self._flush()

    def data(self, data: bytes) -> None:
        session = self.session
        session.receive_data(data)
        self._flush()

    def connection_down(self, reason: str) -> None:
        self.log.info("connection to QEMU closed (%s)", reason)
        self._transport = None
        self.connected.clear()
        self.synchronized.clear()
        for _, _, timer in self._inflight.values():
            timer.cancel()
        self._inflight.clear()
        self.session.send(ev.ConnectionClosed())
        self._flush()

    # -- the card (via _LoopSink) --------------------------------------------------

    def on_card_inserted(self, atr: bytes, reader: str) -> None:
        self._hung = False
        self.log.info("card in %r, ATR %s", reader, hexatr(atr))
        self.session.send(ev.CardInserted(atr))
        self._flush()

    def on_card_removed(self, reason: str) -> None:
        self.log.info("card gone: %s", reason)
        self.session.send(ev.CardRemoved())
        self._flush()

    def on_apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
        entry = self._inflight.pop(seq, None)
        if entry is not None:
            entry[2].cancel()
            if self._trace:
                self._log_answer(entry, response, error)
        elif self._hung:
            self.log.info("the card answered again after its timeout")
        if response is not None and len(response) >= 2:
            self.session.send(ev.ApduResponse(seq, response))
        else:
            self.session.send(ev.ApduFailed(seq, error or "no status word"))
        self._flush()

    def _apdu_timeout(self, seq: int) -> None:
        if self._inflight.pop(seq, None) is None:
            return
        self.log.warning(
            "the card did not answer within %gs: failing the APDU and reporting the card "
            "removed until it answers again",
            self._timeout,
        )
        self._hung = True
        self.session.send(ev.ApduFailed(seq, "timeout"))
        self.session.send(ev.CardRemoved())
        self._flush()
        self.card.recheck()

    # -- session output ------------------------------------------------------------

    def _flush(self) -> None:
        session = self.session
        for event in session.events():
            if type(event) is ev.TransmitApdu:
                self._transmit(event)
            else:
                self._on_event(event)
        out = session.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)

    def _transmit(self, event: ev.TransmitApdu) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._timeout, self._apdu_timeout, event.seq)
        self._inflight[event.seq] = (time.perf_counter() if self._trace else 0.0, event.apdu, timer)
        self.card.transmit(event.seq, event.apdu)

    def _log_answer(self, entry: tuple, response: bytes | None, error: str | None) -> None:
        started, apdu, _ = entry
        ms = (time.perf_counter() - started) * 1000
        command = apdulog.describe_command(apdu, self._trace_data)
        if response is not None:
            answer = apdulog.describe_response(response, self._trace_data, apdu)
        else:
            answer = f"failed: {error}"
        self.log.info("APDU %s -> %s in %.2f ms", command, answer, ms)

    def _on_event(self, event: object) -> None:
        log = self.log
        match event:
            case ev.Synchronized(card_present):
                self.synchronized.set()
                log.info("QEMU synchronized (%s)", "card present" if card_present else "no card")
            case ev.AtrRefused(atr, reason):
                log.error(
                    "QEMU refused the ATR %s, so the guest sees no card: %s", hexatr(atr), reason
                )
            case ev.AtrRewritten(original, sent, reason):
                log.warning(
                    "ATR %s sent as %s: %s (rewrite-atr='no' switches this off)",
                    hexatr(original),
                    hexatr(sent),
                    reason,
                )
            case ev.PeerProtocolError(error):
                log.error("dropping the connection: the peer broke the VSCard protocol: %s", error)
                if self._transport is not None:
                    self._transport.abort()
            case ev.ShutdownComplete():
                self._done.set()
            case ev.ControlRefused(message, code):
                log.error("QEMU refused %s with code %d", message, code)
            case ev.ResponseChained(_, total):
                log.info("card response of %d bytes served as 61xx + GET RESPONSE", total)
            case ev.ApduRefused(_, reason):
                log.info("APDU failed at once: %s", reason)
            case ev.PendingFailed(_, reason):
                log.info("APDU in flight failed: %s", reason)
            case _:
                log.debug("%s", event)
