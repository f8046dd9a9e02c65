"""One served card: the session, its card side and its connection to QEMU.

The threading model (chosen by measurement, docs/benchmarks.md#B5 and #B6):
one **APDU thread** per card does everything on the APDU path itself — it
polls the socket, feeds the sans-IO session, calls SCardTransmit
synchronously and writes the answer — so a guest command costs no thread
hand-off (the same voluntary wake-ups as a bare relay).  Around it:

* the card side's watchers (the reader monitor) post into the card side's
  inbox and wake the APDU thread through ``_wake_w``;
* the **watchdog** thread looks at ``_calls`` (which card call is running,
  since when) a few times per timeout.  A card that does not answer within
  ``timeout`` keeps the APDU thread stuck in PC/SC for good (SCardCancel does
  not help, docs/pcsc-lite.md#P5), so the watchdog hands the bridge to a new
  APDU thread, which fails the guest's command with VSC_Error, reports the
  card removed and keeps draining QEMU's socket (protocol/VSCARD.md#Q12).  The
  stuck thread, when its call returns, hands the card side back through
  ``_inbox`` and ends.

Who owns what:

* ``_calls`` is the hand-off itself, without a lock on the APDU path: the
  APDU thread puts a token in before every card call and pops it after; the
  watchdog pops the token of a call past its deadline to take over.  Exactly
  one of the two pops it (a dict's pop is atomic), and that one decides: the
  APDU thread carries on, or it was given up on and ends once its call
  returns.
* ``_handoff`` (a lock) guards ``_closed``, which a thread given up on checks
  before it hands the card side back.
* ``_inbox_lock`` guards ``_inbox``; any thread posts, then writes ``_wake_w``.
* Everything else belongs to the current APDU thread (the one the watchdog
  did not give up on), and is handed from one to the next only by the
  watchdog, before it starts the new thread.  The card side, while
  ``_lent``, belongs to the stuck thread until it posts :class:`_CardReturned`.
* ``connected``, ``synchronized``, ``finished``: thread-safe events for
  whoever watches the bridge (the service, tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

from ccidbridge import tls
from ccidbridge.card.base import CardReport, CardSide, Inserted, Removed, TransmitFailed
from ccidbridge.protocol import events as ev
from ccidbridge.protocol.atr import hexatr
from ccidbridge.protocol.gate import Gate, Refusal
from ccidbridge.protocol.session import BridgeSession
from ccidbridge.runtime import apdulog, peers
from ccidbridge.runtime.trace import CardTrace
from ccidbridge.runtime.transport import (
    RETRY_MAX,
    RETRY_MIN,
    Connection,
    Listener,
    TlsHandshake,
    TransportError,
    finish_connect,
    start_connect,
    tls_failure,
)
from ccidbridge.spec import ServedCard, is_loopback

#: How long shutdown waits for QEMU to ack CardRemove and ReaderRemove.
SHUTDOWN_ACK_TIMEOUT = 1.0
#: Stop reading the peer while this much of our output waits in our buffer:
#: a peer that does not read gets no new commands in (docs/benchmarks.md#B2).
OUT_HIGH_WATER = 4096
NOT_ANSWERING = "the card is not answering"
#: A TLS peer that has not finished its handshake by then loses its connection.
TLS_HANDSHAKE_TIMEOUT = 10.0

_IN = select.POLLIN
_OUT = select.POLLOUT
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


class _Call(NamedTuple):
    """A card call under way: for which guest APDU (None: a card report), due when."""

    seq: int | None
    deadline: float


@dataclass(frozen=True, slots=True)
class _CardReturned:
    """Posted by a thread the watchdog gave up on: its card call came back."""

    failed: bool
    reports: list[CardReport] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Stop:
    """End: with ``goodbye``, CardRemove + ReaderRemove to QEMU first."""

    goodbye: bool = True


class _Abandoned(Exception):
    """This APDU thread was replaced while it was stuck in a card call."""


class CardBridge:
    """Serves one passthrough smartcard from :meth:`start` until :meth:`stop`."""

    def __init__(
        self,
        served: ServedCard,
        card: CardSide,
        log: Log | None = None,
        trace: int = 0,
        tracer: CardTrace | None = None,
    ) -> None:
        """``trace``: 1 logs every APDU (command header, length, SW, time),
        2 adds the data of commands that carry no PIN (apdulog).  ``tracer``:
        this card's lines in ``run --trace FILE`` (runtime/trace.py)."""
        self.served = served
        self.card = card
        self.log: Log = log or logging.getLogger(f"ccidbridge.{served.label}")
        self.session = BridgeSession(
            reader_name=served.reader.name or served.reader.match or "ccidbridge",
            rewrite_atr=served.reader.rewrite_atr,
            keep=served.reader.keep,
        )
        self._endpoint = served.endpoint
        self._timeout = served.reader.apdu_timeout
        self._trace = trace >= 1
        self._trace_data = trace >= 2
        # -- safety (the APDU thread's): policy + PIN guard (protocol/gate.py), the trace
        self._gate = Gate(served.pin_guard, served.policy)
        self._tracer = tracer
        # -- shared, see the module docstring
        self._calls: dict[int, _Call] = {}  # token -> the card call under way
        self._token = 0  # the APDU thread's: the last token it used
        self._threads = 0  # APDU threads started, for their names
        self._handoff = threading.Lock()
        self._inbox: list[object] = []
        self._inbox_lock = threading.Lock()  # guards _inbox only
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Closed only with the bridge object: a late post must never hit a reused fd.
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._closed = False
        self.connected = threading.Event()
        self.synchronized = threading.Event()
        self.finished = threading.Event()
        #: why the bridge ended other than by stop(): None, or one line
        self.failure: str | None = None
        self.transport_error = False
        # -- the APDU thread's
        self._poll = select.poll()
        self._poll.register(self._wake_r, _IN)
        self._listener: Listener | None = None
        self._conn: Connection | None = None
        self._connecting: socket.socket | None = None
        self._handshake: TlsHandshake | None = None
        self._tls_ctx: ssl.SSLContext | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN
        self._said_waiting = False
        self._said: set[str] = set()  # conditions logged once until they end
        self._peer_uids = peers.default_peer_uids()
        self._out = bytearray()
        self._reading = False
        self._holds: list[tuple[float, int]] = []  # (due, token) for ReleaseAtr (R10)
        self._lent = False  # the card side is with a thread the watchdog gave up on
        self._stopping_at: float | None = None
        self._done = False
        self._watchdog_stop = threading.Event()

    # -- lifecycle (any thread) ------------------------------------------------------

    def start(self) -> None:
        """Open the endpoint (raises TransportError), then serve on the APDU thread."""
        if self._endpoint.tls is not None:
            try:
                self._tls_ctx = tls.context(self._endpoint.tls, self._endpoint.bridge_listens)
            except tls.TlsFilesError as exc:
                raise TransportError(f"TLS: {exc}") from None
        if self._endpoint.bridge_listens:
            if self._endpoint.kind == "tcp" and not is_loopback(self._endpoint.host):
                self.log.warning(
                    "listening on %s:%s, which is not loopback: anyone who can reach it can "
                    "use the card",
                    self._endpoint.host,
                    self._endpoint.port,
                )
            if self._endpoint.kind == "unix" and self._endpoint.path:
                problem = peers.directory_problem(self._endpoint.path, self._peer_uids)
                if problem:
                    raise TransportError(f"not listening on {self._endpoint.path}: {problem}")
            self._listener = Listener(self._endpoint)
            self._poll.register(self._listener.fd, _IN)
            self.log.info("listening on %s", self._endpoint.describe())
        self.card.start(self._wake)
        self._spawn([])
        threading.Thread(target=self._watch, name="ccidbridge-watchdog", daemon=True).start()

    def stop(self, wait: float = SHUTDOWN_ACK_TIMEOUT + 1.0) -> None:
        """SIGINT/SIGTERM: fail pending APDUs, CardRemove + ReaderRemove, wait
        briefly for QEMU's acks, then close.  A card call stuck in a hung card
        is given up at once, so the goodbye is never held up by the card."""
        self._post(_Stop())
        self._take_over_all("the bridge is stopping")
        self.finished.wait(wait)

    def kill(self) -> None:
        """Vanish without a word, like ``kill -9`` (tests): close the socket only."""
        self._post(_Stop(goodbye=False))
        self._take_over_all("the bridge is stopping")
        self.finished.wait(2.0)

    # -- waking the APDU thread (any thread) ------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe is awake enough
            os.write(self._wake_w, b"\0")

    def _post(self, item: object) -> None:
        with self._inbox_lock:
            self._inbox.append(item)
        self._wake()

    def _give_back(self, item: _CardReturned) -> None:
        """On a thread the watchdog gave up on: hand the card side back, or, if
        the bridge has ended meanwhile, stop it here (this thread owns it)."""
        with self._handoff:
            closed = self._closed
            if not closed:
                self._post(item)
        if closed:
            self.card.stop()

    # -- the watchdog ---------------------------------------------------------------------

    def _watch(self) -> None:
        period = min(self._timeout / 8, 1.0)
        while not self._watchdog_stop.wait(period):
            now = time.monotonic()
            for token, call in list(self._calls.items()):  # a copy made under the GIL
                if now >= call.deadline:
                    why = f"the card did not answer within {self._timeout:g}s"
                    self._take_over(token, why)

    def _take_over_all(self, why: str) -> None:
        for token in list(self._calls):
            self._take_over(token, why)

    def _take_over(self, token: int, why: str) -> None:
        """Hand the bridge to a new APDU thread; the stuck one keeps only its card call."""
        call = self._calls.pop(token, None)
        if call is None:
            return  # it returned meanwhile: the APDU thread popped it first
        self._lent = True
        first: list[ev.InputEvent] = []
        if call.seq is not None:
            first.append(ev.ApduFailed(call.seq, "timeout"))
        first.append(ev.CardRemoved())
        self.log.warning(
            "%s: failing the APDU and reporting the card removed until it answers again", why
        )
        self._spawn(first)

    def _spawn(self, first: list[ev.InputEvent]) -> None:
        self._threads += 1
        threading.Thread(
            target=self._serve, args=(first,), name=f"ccidbridge-apdu-{self._threads}",
            daemon=True,
        ).start()

    # -- the APDU thread ------------------------------------------------------------------

    def _serve(self, first: list[ev.InputEvent]) -> None:
        try:
            for event in first:
                self._tell(event)
            self._loop()
        except _Abandoned:
            return
        except Exception as exc:  # noqa: BLE001 - reported to the service, which restarts us
            self.log.exception("this card's bridge failed")
            self.failure = f"{type(exc).__name__}: {exc}"
        self._finish()

    def _loop(self) -> None:
        poll, monotonic = self._poll.poll, time.monotonic
        while not self._done:
            due = self._next_due()
            timeout = -1 if due is None else max(0, int((due - monotonic()) * 1000) + 1)
            for fd, mask in poll(timeout):
                conn = self._conn
                if conn is not None and fd == conn.fd:  # the hot path first
                    if mask & _OUT:
                        self._flush_out()
                    if mask & (_IN | _GONE) and self._conn is conn:
                        self._read(conn)
                elif fd == self._wake_r:
                    self._woken()
                elif self._listener is not None and fd == self._listener.fd:
                    self._accept()
                elif self._connecting is not None and fd == self._connecting.fileno():
                    self._connect_done()
                elif self._handshake is not None and fd == self._handshake.fd:
                    self._step_handshake()
            if due is not None and monotonic() >= due:
                self._due(monotonic())

    def _next_due(self) -> float | None:
        """The earliest time something is due (R10's pauses, a retry, a deadline)."""
        due = self._holds[0][0] if self._holds else None
        for when in (
            self._stopping_at,
            self._handshake.deadline if self._handshake is not None else None,
            None if self._lent else self.card.next_due(),
            self._retry_at if self._wants_connect() else None,
        ):
            if when is not None and (due is None or when < due):
                due = when
        return due

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 512)
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for item in items:
            if isinstance(item, _Stop):
                if not item.goodbye:
                    self._close_connection("killed", tell=False)
                    self._done = True
                    return
                self._begin_stop()
            elif isinstance(item, _CardReturned):
                self._card_returned(item)
        if not self._lent:
            self._card_reports()

    def _due(self, now: float) -> None:
        while self._holds and self._holds[0][0] <= now:
            _, token = self._holds.pop(0)
            self._tell(ev.ReleaseAtr(token))
        if not self._lent:
            card_due = self.card.next_due()
            if card_due is not None and card_due <= now:
                self._card_reports()
        if self._handshake is not None and now >= self._handshake.deadline:
            self._refuse_tls("it stalled in the TLS handshake")
        if self._stopping_at is not None and now >= self._stopping_at:
            self.log.warning("QEMU did not acknowledge the shutdown in time")
            self._done = True
        if self._wants_connect() and now >= self._retry_at:
            self._try_connect()

    # -- the card side (APDU thread) ----------------------------------------------------

    def _card_call(self, seq: int | None, now: float) -> int:
        """Put a token in ``_calls`` for the card call about to start; returns it."""
        self._token = token = self._token + 1
        self._calls[token] = _Call(seq, now + self._timeout)
        return token

    def _card_call_done(self, token: int) -> bool:
        """True if this thread still owns the bridge after its card call."""
        return self._calls.pop(token, None) is not None

    def _card_reports(self) -> None:
        now = time.monotonic()
        token = self._card_call(None, now)
        reports = self.card.reports(now)
        if not self._card_call_done(token):
            self._give_back(_CardReturned(False, reports))
            raise _Abandoned()
        self._apply_reports(reports)

    def _apply_reports(self, reports: list[CardReport]) -> None:
        for report in reports:
            self._gate.forget()  # G7: a reset or another card; nothing is known
            if isinstance(report, Inserted):
                self.log.info("card in %r, ATR %s", report.reader, hexatr(report.atr))
                self._tell(ev.CardInserted(report.atr, report.protocol))
            elif isinstance(report, Removed):
                self.log.info("card gone: %s", report.reason)
                self._tell(ev.CardRemoved())

    def _card_returned(self, item: _CardReturned) -> None:
        """The card side is back from the thread the watchdog gave up on."""
        self._lent = False
        self.log.info("the card answered again after its timeout")
        self._apply_reports(item.reports)
        token = self._card_call(None, time.monotonic())
        self.card.revive(item.failed)
        if not self._card_call_done(token):
            self._give_back(_CardReturned(True))
            raise _Abandoned()
        self._card_reports()

    def _transmit(self, seq: int, apdu: bytes) -> None:
        """The hot path: the guest's APDU to the card, its answer to the session."""
        if self._lent:
            self.session.handle(ev.ApduFailed(seq, NOT_ANSWERING))
            return
        refusal = self._gate.check(apdu)  # the policy and the PIN guard
        if refusal is not None:
            self._refuse(seq, apdu, refusal)
            return
        started = time.monotonic()
        token = self._card_call(seq, started)
        try:
            response: bytes | None = self.card.transmit(apdu)
            error = ""
        except TransmitFailed as exc:
            response, error = None, str(exc)
        if not self._card_call_done(token):
            self._give_back(_CardReturned(response is None))
            raise _Abandoned()
        if self._trace:
            self._log_apdu(apdu, response, error, started)
        if self._tracer is not None:
            self._tracer.exchange(apdu, response, started, error)
        if response is not None:
            self._gate.answered(apdu, response)
            self.session.handle(ev.ApduResponse(seq, response))
        else:
            self.session.handle(ev.ApduFailed(seq, error))
            self._card_reports()  # what the failure did to the card

    def _refuse(self, seq: int, apdu: bytes, refusal: Refusal) -> None:
        """The gate answers for the card, which never sees the command."""
        level = logging.WARNING if refusal.first else logging.DEBUG
        self.log.log(level, "APDU %s refused by the %s: %s",
                     apdulog.describe_command(apdu, self._trace_data), refusal.by, refusal.reason)
        if self._tracer is not None:
            self._tracer.exchange(apdu, refusal.sw, time.monotonic(), by=refusal.by)
        self.session.handle(ev.ApduResponse(seq, refusal.sw))

    def _log_apdu(self, apdu: bytes, response: bytes | None, error: str, started: float) -> None:
        ms = (time.monotonic() - started) * 1000
        command = apdulog.describe_command(apdu, self._trace_data)
        if response is not None:
            answer = apdulog.describe_response(response, self._trace_data, apdu)
        else:
            answer = f"failed: {error}"
        self.log.info("APDU %s -> %s in %.2f ms", command, answer, ms)

    # -- the session (APDU thread) ------------------------------------------------------

    def _tell(self, event: ev.InputEvent) -> None:
        """Give the session ``event`` and carry out what it says."""
        self.session.handle(event)
        self._act()

    def _act(self) -> None:
        """Carry out the session's events one by one, writing its output as it comes.

        Events are taken one at a time, so that if this thread is abandoned in
        a card call the rest stay in the session for the next APDU thread.
        """
        session = self.session
        for event in session.events():
            if type(event) is ev.TransmitApdu:
                self._transmit(event.seq, event.apdu)
            else:
                self._on_event(event)
            self._write(session.data_to_send())
        self._write(session.data_to_send())

    def _on_event(self, event: ev.OutputEvent) -> None:
        log = self.log
        match event:
            case ev.HoldAtr(token, seconds):
                self._holds.append((time.monotonic() + seconds, token))
                self._holds.sort()
            case ev.Synchronized(card_present):
                self.synchronized.set()
                log.info("QEMU synchronized (%s)", "card present" if card_present else "no card")
            case ev.AtrAccepted(atr):
                log.debug("QEMU accepted the ATR %s", hexatr(atr))
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
                self._close_connection("protocol error", tell=True)
            case ev.ShutdownComplete():
                self._done = True
            case ev.ControlRefused(message, code):
                log.error("QEMU refused %s with code %d", message, code)
            case ev.PresentationApplied(rule, where, detail):
                log.info("presentation rule %s, %s: %s (keep='%s' switches it off)",
                         rule, where, detail, rule)
            case ev.PresentationSkipped(rule, where, reason):
                log.warning("presentation rule %s left %s unchanged: %s", rule, where, reason)
            case ev.ResponseChained(_, total):
                log.info("card response of %d bytes served as 61xx + GET RESPONSE", total)
            case ev.ApduAnsweredLocally(apdu, length):
                log.debug("%s answered from the bridge's buffer (%d bytes)",
                          apdulog.describe_command(apdu), length)
            case ev.ApduRefused(apdu, reason):
                log.info("APDU %s failed at once: %s", apdulog.describe_command(apdu), reason)
            case ev.PendingFailed(_, reason):
                log.info("APDU in flight failed: %s", reason)
            case ev.StaleApduDropped(apdu):
                log.debug("APDU %s dropped: QEMU already settled it (R6)",
                          apdulog.describe_command(apdu))
            case ev.LateResponseDropped(seq):
                log.debug("late answer to APDU #%d dropped", seq)
            case ev.PeerInit(version, _):
                log.debug("peer Init, version %d", version)
            case ev.UnexpectedMessage(description):
                log.warning("ignored from the peer: %s", description)
            case ev.TransmitApdu():
                raise AssertionError("TransmitApdu is handled by _act")

    # -- stopping (APDU thread) ---------------------------------------------------------

    def _begin_stop(self) -> None:
        if self._stopping_at is not None:
            return
        self._stopping_at = time.monotonic() + SHUTDOWN_ACK_TIMEOUT
        self._tell(ev.Shutdown())

    def _finish(self) -> None:
        """End of the APDU thread: close everything this bridge opened."""
        self._watchdog_stop.set()
        self._close_connection("stopping", tell=False)
        if self._connecting is not None:
            self._connecting.close()
            self._connecting = None
        if self._handshake is not None:
            with contextlib.suppress(OSError):
                self._handshake.sock.close()
            self._handshake = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._handoff:
            self._closed = True
        with self._inbox_lock:
            returned = any(isinstance(item, _CardReturned) for item in self._inbox)
            self._inbox.clear()
        if not self._lent or returned:
            self.card.stop()
        self.finished.set()

    # -- the connection (APDU thread) -----------------------------------------------------

    def _wants_connect(self) -> bool:
        return (
            not self._endpoint.bridge_listens
            and self._conn is None
            and self._connecting is None
            and self._handshake is None
            and self._stopping_at is None
            and not self._done
        )

    def _try_connect(self) -> None:
        ep = self._endpoint
        if ep.kind == "unix" and ep.path:
            problem = peers.directory_problem(ep.path, self._peer_uids)
            if problem:
                self._once("dir", logging.ERROR, f"not connecting to {ep.path}: {problem}")
                self._retry_later()
                return
        try:
            sock, done = start_connect(self._endpoint)
        except OSError as exc:
            self._connect_failed(exc)
            return
        if done:
            self._connection_up(sock, self._endpoint.describe())
        else:
            self._connecting = sock
            self._poll.register(sock.fileno(), _OUT)

    def _connect_done(self) -> None:
        sock, self._connecting = self._connecting, None
        assert sock is not None
        self._poll.unregister(sock.fileno())
        try:
            finish_connect(sock)
        except OSError as exc:
            self._connect_failed(exc)
            return
        self._connection_up(sock, self._endpoint.describe())

    def _connect_failed(self, exc: OSError) -> None:
        if not self._said_waiting:
            self.log.info(
                "waiting for QEMU on %s (%s)", self._endpoint.describe(), exc.strerror or exc
            )
            self._said_waiting = True
        self._retry_later()

    def _retry_later(self) -> None:
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _once(self, key: str, level: int, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.log(level, "%s", message)

    def _accept(self) -> None:
        assert self._listener is not None
        got = self._listener.accept()
        if got is None:
            return
        sock, peer = got
        busy = self._conn is not None or self._handshake is not None
        if busy or self._stopping_at is not None or self._done:
            if busy:
                self.log.warning(
                    "refused a second connection on %s: the card is already served to one peer",
                    self._endpoint.describe(),
                )
            sock.close()
            return
        self._connection_up(sock, peer)

    def _connection_up(self, sock: socket.socket, peer: str) -> None:
        if self._tls_ctx is not None and not isinstance(sock, ssl.SSLSocket):
            self._start_tls(sock, peer)
            return
        if sock.family == socket.AF_UNIX:
            uid = peers.peer_uid(sock)
            if uid not in self._peer_uids:
                sock.close()
                self._once(
                    f"uid:{uid}",
                    logging.WARNING,
                    f"refused the peer on {peer}: it runs as {peers.user_name(uid)}, not as an "
                    f"accepted user ({peers.describe_uids(self._peer_uids)})",
                )
                if not self._endpoint.bridge_listens:
                    self._retry_later()
                return
        self._said.clear()
        self._said_waiting = False
        self._retry_delay = RETRY_MIN
        conn = Connection(sock, self._endpoint, peer)
        self._conn = conn
        self._out.clear()
        self._reading = True
        self._poll.register(conn.fd, _IN)
        self.log.info("connected to QEMU (%s)", peer)
        self.connected.set()
        self._tell(ev.ConnectionOpened())

    # -- TLS (APDU thread) ----------------------------------------------------------------

    def _start_tls(self, sock: socket.socket, peer: str) -> None:
        assert self._tls_ctx is not None
        sock.setblocking(False)
        listens = self._endpoint.bridge_listens
        tsock = self._tls_ctx.wrap_socket(
            sock,
            server_side=listens,
            do_handshake_on_connect=False,
            server_hostname=None if listens else (self._endpoint.host or "localhost"),
        )
        self._handshake = TlsHandshake(tsock, peer, time.monotonic() + TLS_HANDSHAKE_TIMEOUT)
        self._poll.register(self._handshake.fd, _IN | _OUT)
        self._step_handshake()

    def _step_handshake(self) -> None:
        hs = self._handshake
        assert hs is not None and self._endpoint.tls is not None
        try:
            waits = hs.step()
        except (ssl.SSLError, OSError) as exc:
            self._refuse_tls(tls_failure(exc))
            return
        if waits:
            self._poll.modify(hs.fd, waits)
            return
        problem = tls.peer_name_problem(hs.sock, self._endpoint.tls)
        if problem:
            self._refuse_tls(problem)
            return
        self._poll.unregister(hs.fd)
        self._handshake = None
        names = dict.fromkeys(tls.certificate_names(hs.sock.getpeercert() or {}))
        self.log.info("%s with %s, whose certificate names %s", hs.sock.version(), hs.peer,
                      ", ".join(names) or "nobody")
        self._connection_up(hs.sock, hs.peer)

    def _refuse_tls(self, why: str) -> None:
        """The peer gets nothing: not one VSCard byte was written to it."""
        hs, self._handshake = self._handshake, None
        assert hs is not None
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._poll.unregister(hs.fd)
        with contextlib.suppress(OSError):
            hs.sock.close()
        self._once(f"tls:{why}", logging.WARNING, f"refused the TLS peer at {hs.peer}: {why}")
        if not self._endpoint.bridge_listens:
            self._retry_later()

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.recv()
        except BlockingIOError:
            return
        except OSError as exc:
            self._close_connection(exc.strerror or str(exc), tell=True)
            return
        if not data:
            self._close_connection("closed by peer", tell=True)
            return
        self.session.receive_data(data)
        self._act()

    def _write(self, data: bytes) -> None:
        conn = self._conn
        if not data or conn is None:
            return
        if self._out:
            self._out += data
        else:
            try:
                sent = conn.send(data)
            except OSError as exc:
                self._close_connection(exc.strerror or str(exc), tell=True)
                return
            if sent == len(data):
                return
            self._out += data[sent:]
        self._update_interest()

    def _flush_out(self) -> None:
        conn = self._conn
        if conn is None or not self._out:
            return
        try:
            sent = conn.send(self._out)
        except OSError as exc:
            self._close_connection(exc.strerror or str(exc), tell=True)
            return
        del self._out[:sent]
        self._update_interest()

    def _update_interest(self) -> None:
        """Backpressure: while our output waits, take no new commands in."""
        conn = self._conn
        if conn is None:
            return
        reading = len(self._out) < OUT_HIGH_WATER if self._out else True
        mask = (_IN if reading else 0) | (_OUT if self._out else 0)
        self._reading = reading
        self._poll.modify(conn.fd, mask)

    def _close_connection(self, reason: str, tell: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._poll.unregister(conn.fd)
        conn.close()
        self._out.clear()
        self.connected.clear()
        self.synchronized.clear()
        self._holds.clear()
        if tell:
            self.log.info("connection to QEMU closed (%s)", reason)
            self._retry_at = time.monotonic() + RETRY_MIN
            self._tell(ev.ConnectionClosed())


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
