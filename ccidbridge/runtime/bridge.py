"""One served card: the session, its card side and its connection to QEMU.

Everything here runs on the event loop, except the card side's own threads,
whose reports arrive through :class:`_LoopSink` (``call_soon_threadsafe``)
— with one exception, the APDU answer: the card side's thread writes it to
the socket itself (:meth:`CardBridge.answer_now`), because a hop through the
event loop (self-pipe write, loop wake-up, one more loop iteration) cost about
as much as everything else the bridge does per APDU (benchmarks, issue 6).
That is why the session and the socket writes are guarded by locks, and why
the runtime never calls into the card side while holding them.
The socket is always drained, even while the card is busy: QEMU's chardev
writes block its main loop when the peer stops reading (qemu-passthru.md
gotcha 12).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from ccidbridge.card.base import CardSide
from ccidbridge.protocol import events as ev
from ccidbridge.protocol.atr import hexatr
from ccidbridge.protocol.session import BridgeSession, State
from ccidbridge.runtime import apdulog
from ccidbridge.runtime.transport import Link
from ccidbridge.spec import ServedCard

#: How long shutdown waits for QEMU to ack CardRemove and ReaderRemove.
SHUTDOWN_ACK_TIMEOUT = 1.0


class _LoopSink:
    """The CardSink handed to the card side: every call hops onto the loop,
    except an APDU answer that :meth:`CardBridge.answer_now` can write at once.

    Calls made on the loop's own thread (a card side that answers
    synchronously) use ``call_soon``: no self-pipe write, no wake-up.
    """

    def __init__(self, bridge: CardBridge, loop: asyncio.AbstractEventLoop) -> None:
        self._bridge = bridge
        self._soon = loop.call_soon
        self._threadsafe = loop.call_soon_threadsafe
        self._loop_thread = threading.get_ident()

    def _call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() == self._loop_thread:
            self._soon(fn, *args)
        else:
            self._threadsafe(fn, *args)

    def card_inserted(self, atr: bytes, reader: str) -> None:
        self._call(self._bridge.on_card_inserted, atr, reader)

    def card_removed(self, reason: str) -> None:
        self._call(self._bridge.on_card_removed, reason)

    def apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
        if threading.get_ident() == self._loop_thread:
            self._soon(self._bridge.on_apdu_done, seq, response, error)
        elif response is None or not self._bridge.answer_now(seq, response):
            self._threadsafe(self._bridge.on_apdu_done, seq, response, error)

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
        #: seq -> (loop.time() when sent to the card, APDU)
        self._inflight: dict[int, tuple[float, bytes]] = {}
        #: One timer for every APDU in flight (not one per APDU: answers that
        #: arrive on the card side's thread cannot cancel loop timers).
        self._watchdog: asyncio.TimerHandle | None = None
        self._hung = False
        #: Guards the session: the loop thread and the card side's thread
        #: (answer_now) both use it.
        self._lock = threading.Lock()
        #: Guards socket writes and ``_backlog``, so bytes leave in the order the
        #: session produced them.  Taken while holding ``_lock`` (never the other
        #: way round); answer_now then lets ``_lock`` go before it writes, so the
        #: loop can take the next request in while the answer is being written.
        self._wlock = threading.Lock()
        self._fd = -1  # the connection's socket, for answer_now
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Bytes answer_now could not write at once; the loop writes them (and
        #: anything after them) in order.
        self._backlog: bytearray | None = None
        #: APDUs for the card side, handed over after ``_lock`` is released.
        self._to_card: list[tuple[int, bytes]] = []
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
        self._tell(ev.Shutdown())
        if self.session.state is not State.CLOSED:
            try:
                await asyncio.wait_for(self._done.wait(), SHUTDOWN_ACK_TIMEOUT)
            except TimeoutError:
                self.log.warning("QEMU did not acknowledge the shutdown in time")
        self.link.shut()

    # -- the connection (transport.Peer) ------------------------------------------

    def connection_up(self, transport: asyncio.Transport, peer: str) -> None:
        sock = transport.get_extra_info("socket")
        self._loop = asyncio.get_running_loop()
        with self._lock:
            with self._wlock:
                self._transport = transport
                self._fd = sock.fileno() if sock is not None else -1
                self._backlog = None
            self.log.info("connected to QEMU (%s)", peer)
            self.connected.set()
            self.session.handle(ev.ConnectionOpened())
            self._flush()
        if self._to_card:
            self._give_card()

    def data(self, data: bytes) -> None:
        with self._lock:
            self.session.receive_data(data)
            self._flush()
        if self._to_card:
            self._give_card()

    def connection_down(self, reason: str) -> None:
        self.log.info("connection to QEMU closed (%s)", reason)
        with self._lock:
            with self._wlock:
                self._transport = None
                self._fd = -1
                self._backlog = None
            self.connected.clear()
            self.synchronized.clear()
            self._inflight.clear()
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self.session.handle(ev.ConnectionClosed())
            self._flush()
        if self._to_card:
            self._give_card()

    # -- the card (via _LoopSink) --------------------------------------------------

    def _tell(self, event: ev.InputEvent) -> None:
        """Give the session ``event`` and carry out what it says (loop thread)."""
        with self._lock:
            self.session.handle(event)
            self._flush()
        if self._to_card:
            self._give_card()

    def on_card_inserted(self, atr: bytes, reader: str) -> None:
        self._hung = False
        self.log.info("card in %r, ATR %s", reader, hexatr(atr))
        self._tell(ev.CardInserted(atr))

    def _release_atr(self, token: int) -> None:
        """The guest has seen the card gone long enough (session rule R10)."""
        self._tell(ev.ReleaseAtr(token))

    def on_card_removed(self, reason: str) -> None:
        self.log.info("card gone: %s", reason)
        self._tell(ev.CardRemoved())

    def on_apdu_done(self, seq: int, response: bytes | None, error: str | None) -> None:
        """The answer, on the loop (a failure, a card side on the loop's thread,
        or whatever :meth:`answer_now` left to the loop)."""
        with self._lock:
            entry = self._inflight.pop(seq, None)
            if entry is not None:
                if self._trace:
                    self._log_answer(entry, response, error)
            elif self._hung:
                self.log.info("the card answered again after its timeout")
            if response is not None:  # one without SW1 SW2 is failed by the session (R5)
                self.session.handle(ev.ApduResponse(seq, response))
            else:
                self.session.handle(ev.ApduFailed(seq, error or "no status word"))
            self._flush()
        if self._to_card:
            self._give_card()

    def answer_now(self, seq: int, response: bytes) -> bool:
        """The hot path, on the card side's thread: hand ``response`` to the
        session and write what it says straight to the socket.

        Returns False, having changed nothing, when the loop must do it
        instead (:meth:`on_apdu_done`): per-APDU tracing is on, the APDU is no
        longer in flight (timed out, connection gone) or the socket is
        closing.  Any session events (rare: e.g. a long answer that gets
        chained) go to the loop.  Bytes that cannot be written at once — the
        transport still holds earlier ones, or the write was partial — are
        left to the loop, in order (``_backlog``).
        """
        if self._trace:
            return False
        lock, wlock = self._lock, self._wlock
        with lock:
            transport = self._transport
            loop = self._loop
            if (
                transport is None
                or loop is None
                or self._fd < 0
                or transport.is_closing()
                or self._inflight.pop(seq, None) is None
            ):
                return False
            session = self.session
            session.handle(ev.ApduResponse(seq, response))
            events = list(session.events())
            out = session.data_to_send()
            if out:
                wlock.acquire()  # before letting the session go: keeps the order
        if out:
            try:
                if self._backlog is None and not transport.get_write_buffer_size():
                    try:
                        n = os.write(self._fd, out)
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        n = len(out)  # the connection is going; the loop will see it close
                    out = out[n:]
                if out:
                    if self._backlog is None:
                        self._backlog = bytearray()
                        loop.call_soon_threadsafe(self._write_backlog)
                    self._backlog += out
            finally:
                wlock.release()
        if events:
            loop.call_soon_threadsafe(self._late_events, events)
        return True

    def _write_backlog(self) -> None:
        with self._wlock:
            backlog, self._backlog = self._backlog, None
            if backlog and self._transport is not None:
                self._transport.write(bytes(backlog))

    def _late_events(self, events: list[object]) -> None:
        with self._lock:
            for event in events:
                self._on_event(event)
            self._flush()
        if self._to_card:
            self._give_card()

    def _check_timeouts(self) -> None:
        """The watchdog: fail every APDU the card has sat on for ``apdu_timeout``
        seconds, then sleep until the next one would be due."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        expired = False
        with self._lock:
            now = loop.time()
            for seq, (started, _) in list(self._inflight.items()):
                if now - started < self._timeout - 0.001:
                    continue
                del self._inflight[seq]
                expired = True
                self.log.warning(
                    "the card did not answer within %gs: failing the APDU and reporting the card "
                    "removed until it answers again",
                    self._timeout,
                )
                self._hung = True
                self.session.handle(ev.ApduFailed(seq, "timeout"))
                self.session.handle(ev.CardRemoved())
            self._flush()
            if self._inflight:
                oldest = min(started for started, _ in self._inflight.values())
                self._watchdog = loop.call_at(oldest + self._timeout, self._check_timeouts)
        if self._to_card:
            self._give_card()
        if expired:
            self.card.recheck()

    # -- session output ------------------------------------------------------------

    def _flush(self) -> None:
        """Act on the session's events and write its output.  Holds ``_lock``."""
        session = self.session
        for event in session.events():
            if type(event) is ev.TransmitApdu:
                self._transmit(event)
            else:
                self._on_event(event)
        out = session.data_to_send()
        if out and self._transport is not None:
            with self._wlock:
                if self._backlog is not None:
                    self._backlog += out
                else:
                    self._transport.write(out)

    def _transmit(self, event: ev.TransmitApdu) -> None:
        loop = asyncio.get_running_loop()
        self._inflight[event.seq] = (loop.time(), event.apdu)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check_timeouts)
        self._to_card.append((event.seq, event.apdu))

    def _give_card(self) -> None:
        """Hand the APDUs :meth:`_flush` queued to the card side, in order.

        Never while holding ``_lock``: a card side may take locks of its own
        in transmit() that its thread holds while it waits for ``_lock`` in
        :meth:`answer_now` (a lock-order deadlock).  Loop thread only.
        """
        while self._to_card:
            items, self._to_card = self._to_card, []
            for seq, apdu in items:
                self.card.transmit(seq, apdu)

    def _log_answer(self, entry: tuple, response: bytes | None, error: str | None) -> None:
        started, apdu = entry
        ms = (time.monotonic() - started) * 1000
        command = apdulog.describe_command(apdu, self._trace_data)
        if response is not None:
            answer = apdulog.describe_response(response, self._trace_data, apdu)
        else:
            answer = f"failed: {error}"
        self.log.info("APDU %s -> %s in %.2f ms", command, answer, ms)

    def _on_event(self, event: object) -> None:
        log = self.log
        match event:
            case ev.HoldAtr(token, seconds):
                assert self._loop is not None
                self._loop.call_later(seconds, self._release_atr, token)
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
                log.error("the peer broke the VSCard protocol, connection dropped: %s", error)
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
