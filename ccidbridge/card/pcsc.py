"""The bridge's card side over pyscard's low-level ``smartcard.scard`` (pcsc-lite).

Two daemon threads, each with its own PC/SC context (pcsc-lite serialises the
calls on one context, so a blocked SCardGetStatusChange would stall transmits):

* the **monitor** blocks in SCardGetStatusChange on every reader plus
  ``\\\\?PnP?\\Notification`` with a bounded timeout (a fallback rescan, since
  PnP never fires with vpcd; test-stack.md §2).  It chooses the reader per the
  :class:`ReaderSpec`, says "not found"/"ATR does not match" once, and tells the
  worker to attach to / detach from a card.  pcscd restarts show up here first
  (SCARD_F_COMM_ERROR, then SCARD_E_NO_SERVICE on the dead context forever,
  notes §1 "Restarting pcscd"): release, back off <= 1 s, new context.
* the **card worker** owns the card context and handle and executes a queue in
  order: the runtime's APDUs and the monitor's attach/detach.  Every sink call
  about the card (inserted, removed, apdu_done) comes from here, so an APDU's
  error always precedes the card_removed it causes.

Facts from the real stack that shape the code (test-stack.md §2 table, and
checked again with pcscd 1.9.9 for this module):

* the default disposition must be SCARD_LEAVE_CARD (pyscard's high level
  unpowers);
* passing a failed connect's hcard to SCardTransmit raises SystemError, so a
  handle is only kept after a successful connect;
* SCardTransmit takes a list, not bytes; on failure its response is garbage;
* a crashed card answers rv=0 with an EMPTY response, then
  SCARD_E_NOT_TRANSACTED, then the reader goes EMPTY (gotcha 11);
* a hung card blocks SCardTransmit forever; SCardCancel does not help
  (gotcha 10), hence :meth:`PcscCard.recheck` and daemon threads;
* a reset by another program neither wakes SCardGetStatusChange nor changes
  the event counter (unlike what the brief expected): it shows up only as
  SCARD_W_RESET_CARD on our next call, which we answer with SCardReconnect
  (LEAVE_CARD) and ``card_inserted`` again (qemu-passthru.md gotcha 13);
* the event counter (high word of the event state) changes only on insertion
  and removal, so a changed counter while present means "another card";
* another program letting go of the card (EXCLUSIVE/INUSE cleared) does not
  wake SCardGetStatusChange either, so a busy card is retried on a backoff
  capped at 1 s (plus a poke when the monitor does see the state move);
* the runtime writes APDU answers from our worker thread under its own lock and
  calls transmit() under that lock: answers refused on the caller's thread take
  no lock of ours (see :meth:`_Emitter.refuse`).

Nothing here logs, least of all APDU contents (PINs travel in VERIFY etc.).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import queue
import threading
import time
from dataclasses import dataclass

from smartcard import scard

from ccidbridge.card.base import CardSink
from ccidbridge.protocol.atr import hexatr
from ccidbridge.spec import CardProtocol as Protocol  # the lead renames the uses
from ccidbridge.spec import ReaderSpec, Share

PNP_READER = "\\\\?PnP?\\Notification"
#: GetStatusChange timeout: the fallback rescan of the reader list.
RESCAN_MS = 1000
#: pcsc-lite refuses an SCardGetStatusChange over more than 16 readers
#: (PCSCLITE_MAX_READERS_CONTEXTS), the PnP pseudo reader included: with 16
#: readers nothing would ever be watched.  So only the readers the spec can
#: use are watched, at most this many.
MAX_WATCHED = 15
#: Backoff for re-establishing a context / retrying a connect (the brief: <= 1 s).
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
#: How long stop() waits for each thread before abandoning it (a hung card).
STOP_JOIN = 0.5

OK = scard.SCARD_S_SUCCESS
LEAVE = scard.SCARD_LEAVE_CARD
E_TIMEOUT = scard.SCARD_E_TIMEOUT
E_CANCELLED = scard.SCARD_E_CANCELLED
E_NO_READERS = scard.SCARD_E_NO_READERS_AVAILABLE
E_SHARING = scard.SCARD_E_SHARING_VIOLATION
E_PROTO = scard.SCARD_E_PROTO_MISMATCH
W_RESET = scard.SCARD_W_RESET_CARD
#: The service went away: this context is dead for good (notes §1).
SERVICE_GONE = frozenset(
    {
        scard.SCARD_F_COMM_ERROR,
        scard.SCARD_E_NO_SERVICE,
        scard.SCARD_E_SERVICE_STOPPED,
        scard.SCARD_E_INVALID_HANDLE,
    }
)
CARD_GONE = frozenset(
    {scard.SCARD_W_REMOVED_CARD, scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_UNPOWERED_CARD}
)
READER_GONE = frozenset({scard.SCARD_E_UNKNOWN_READER, scard.SCARD_E_READER_UNAVAILABLE})
#: Results that say what happened to the card (as opposed to one failed exchange).
HANDLED = SERVICE_GONE | CARD_GONE | READER_GONE | {W_RESET}

PROTOCOLS = {
    Protocol.ANY: scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
    Protocol.T0: scard.SCARD_PROTOCOL_T0,
    Protocol.T1: scard.SCARD_PROTOCOL_T1,
}
SHARE_MODES = {
    Share.EXCLUSIVE: scard.SCARD_SHARE_EXCLUSIVE,
    Share.SHARED: scard.SCARD_SHARE_SHARED,
}

NO_CARD = "no card"
NOT_ANSWERING = "the card is not answering"
NO_SW = "card returned no status word"


def _error_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for key, value in vars(scard).items():
        if key.startswith(("SCARD_E_", "SCARD_W_", "SCARD_F_", "SCARD_P_")) and isinstance(
            value, int
        ):
            names.setdefault(value & 0xFFFFFFFF, key)
    return names


_NAMES = _error_names()


def hr_text(hr: int) -> str:
    """``SCARD_E_NOT_TRANSACTED (0x80100016)`` for a PC/SC result code."""
    hr &= 0xFFFFFFFF
    return f"{_NAMES.get(hr, 'PC/SC error')} (0x{hr:08X})"


def hr_name(hr: int) -> str:
    """``SCARD_E_NO_SERVICE`` (just the name) for one-line messages."""
    hr &= 0xFFFFFFFF
    return _NAMES.get(hr, f"0x{hr:08X}")


def atr_matches(atr: bytes, want: bytes | None, mask: bytes | None) -> bool:
    """``<reader atr= atr-mask=>``: exact, or equal under the mask (same length)."""
    if want is None:
        return True
    if len(atr) != len(want):
        return False
    if mask is None:
        return atr == want
    return all((a & m) == (w & m) for a, w, m in zip(atr, want, mask, strict=True))


def reader_matches(spec: ReaderSpec, name: str) -> bool:
    """Exact ``name=``, else the ``match=`` glob, else any reader."""
    if spec.name is not None:
        return name == spec.name
    if spec.match is not None:
        return fnmatch.fnmatchcase(name, spec.match)
    return True


def describe_spec(spec: ReaderSpec) -> str:
    if spec.name is not None:
        return f"reader {spec.name!r}"
    if spec.match is not None:
        return f"a reader matching {spec.match!r}"
    return "any reader"


def _present(event_state: int) -> bool:
    """A card pcscd can talk to (MUTE cards have no ATR; notes §2)."""
    return bool(event_state & scard.SCARD_STATE_PRESENT) and not (
        event_state & (scard.SCARD_STATE_MUTE | scard.SCARD_STATE_UNKNOWN)
    )


# ------------------------------------------------------------------------ `readers` command


class PcscUnavailable(RuntimeError):
    """PC/SC cannot be used at all; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class ReaderInfo:
    name: str
    card_present: bool
    atr: bytes | None


def _unavailable(hr: int) -> PcscUnavailable:
    if hr & 0xFFFFFFFF in SERVICE_GONE:
        return PcscUnavailable(f"pcscd is not running ({hr_name(hr)})")
    return PcscUnavailable(f"PC/SC is not usable ({hr_text(hr)})")


def list_readers() -> list[ReaderInfo]:
    """Every reader pcscd knows, with card state and ATR (one GetStatusChange, no connect).

    pyscard's ``readers()`` raises a bare EstablishContextException when pcscd
    is down (notes §1); this raises :class:`PcscUnavailable` with one line.
    """
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != OK:
        raise _unavailable(hr)
    try:
        hr, names = scard.SCardListReaders(ctx, [])
        if hr == E_NO_READERS:
            return []
        if hr != OK:
            raise _unavailable(hr)
        hr, states = scard.SCardGetStatusChange(
            ctx, 0, [(n, scard.SCARD_STATE_UNAWARE) for n in names]
        )
        if hr != OK:
            raise _unavailable(hr)
        out = []
        for name, event, atr in states:
            present = _present(event)
            out.append(ReaderInfo(name, present, bytes(atr) if present and atr else None))
        return out
    finally:
        scard.SCardReleaseContext(ctx)


# ------------------------------------------------------------------------------- the sink


class _Emitter:
    """The sink behind a lock: after :meth:`close` returns no call reaches the sink.

    Also remembers which notices were said, so each condition is said once.
    An RLock, so a sink that calls ``stop()`` from inside a callback does not
    deadlock.
    """

    def __init__(self, sink: CardSink) -> None:
        self._sink: CardSink | None = sink
        self._lock = threading.RLock()
        self._said: set[str] = set()
        #: the seq of the worker's last apdu_done (what it last answered)
        self.last_seq: int | None = None

    def done(self, seq: int, response: bytes | None, error: str | None) -> None:
        """The worker's answer."""
        with self._lock:
            self.last_seq = seq
            if self._sink is not None:
                self._sink.apdu_done(seq, response, error)

    def refuse(self, seq: int, error: str) -> None:
        """An answer on the caller's own thread (transmit()/recheck() while the card
        is not answering).  Leaves ``last_seq`` alone.

        Deliberately without the lock: the runtime calls transmit() while holding
        its own lock, which the worker's apdu_done may be waiting for while *it*
        holds ours (the runtime writes answers from our thread) — a deadlock.
        Calls on the caller's thread cannot overlap its own stop() anyway.
        """
        sink = self._sink
        if sink is not None:
            sink.apdu_done(seq, None, error)

    def inserted(self, atr: bytes, reader: str) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink.card_inserted(atr, reader)

    def removed(self, reason: str) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink.card_removed(reason)

    def notice(self, message: str, level: int = logging.INFO) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink.notice(message, level)

    def once(self, key: str, message: str, level: int = logging.INFO) -> None:
        """Say ``message`` unless condition ``key`` was said and not :meth:`forget` since."""
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        self.notice(message, level)

    def forget(self, key: str) -> bool:
        """The condition ended; True if it had been said."""
        with self._lock:
            if key in self._said:
                self._said.discard(key)
                return True
            return False

    def close(self) -> None:
        """No sink call after this returns — after waiting (bounded) for one in progress.

        Bounded, so a caller that holds the lock our sink call waits for (see
        :meth:`refuse`) gets a slow stop() instead of a deadlock.
        """
        acquired = self._lock.acquire(timeout=STOP_JOIN)
        try:
            self._sink = None
        finally:
            if acquired:
                self._lock.release()


# ---------------------------------------------------------------------------- the facade

_STOP = "stop"
_ATTACH = "attach"  # arg: reader name — the monitor wants this card served
_DETACH = "detach"  # arg: reason — card / reader / pcscd gone
_POKE = "poke"  # arg: reader — its state changed (e.g. another program let go)
_PROBE = "probe"  # from recheck(): does the card answer again?
_SERVICE = "service"  # arg: reason — pcscd went away: the worker's context is dead too


class PcscCard:
    """:class:`~ccidbridge.card.base.CardSide` over PC/SC, for one ``ReaderSpec``."""

    def __init__(self, spec: ReaderSpec) -> None:
        self.spec = spec
        self._queue: queue.SimpleQueue[tuple[object, object]] = queue.SimpleQueue()
        self._emit: _Emitter | None = None
        self._stopping = threading.Event()
        #: recheck() was called and the card has not answered since: fail APDUs at once.
        self._suspended = False
        self._worker: _Worker | None = None
        self._monitor: _Monitor | None = None

    # -- CardSide -----------------------------------------------------------------------

    def start(self, sink: CardSink) -> None:
        if self._emit is not None:
            raise RuntimeError("PcscCard.start() called twice")
        self._emit = _Emitter(sink)
        self._worker = _Worker(self, self._emit)
        self._monitor = _Monitor(self, self._emit)
        self._worker.thread.start()
        self._monitor.thread.start()

    def transmit(self, seq: int, apdu: bytes) -> None:
        if self._suspended:
            if self._emit is not None:
                self._emit.refuse(seq, NOT_ANSWERING)
            return
        self._queue.put((seq, apdu))

    def recheck(self) -> None:
        """The runtime timed an APDU out and reported the card removed.

        The worker may be stuck in SCardTransmit for good (a hung card; SCardCancel
        does not help, gotcha 10): fail every queued APDU now and every new one at
        once, and queue a probe that runs as soon as the worker is free again.
        """
        self._suspended = True
        self._fail_queued(NOT_ANSWERING)
        self._queue.put((_PROBE, None))

    def stop(self) -> None:
        """Cancel the monitor, let the worker disconnect (LEAVE_CARD) and release.

        No sink call happens after this returns; a worker stuck in a hung card is
        abandoned (daemon thread) and cleans up itself if the card ever answers.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._emit is not None:
            self._emit.close()
        self._queue.put((_STOP, None))
        if self._monitor is not None:
            self._monitor.cancel_and_join(STOP_JOIN)
        worker = self._worker
        if worker is not None and worker.thread is not threading.current_thread():
            with contextlib.suppress(RuntimeError):
                worker.thread.join(STOP_JOIN)

    # -- internals ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def post(self, op: str, arg: object = None) -> None:
        self._queue.put((op, arg))

    def _fail_queued(self, error: str) -> None:
        """Answer queued APDUs with ``error``; keep control items in their order."""
        keep = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item[0].__class__ is int:
                if self._emit is not None:
                    self._emit.refuse(item[0], error)  # type: ignore[arg-type]
            else:
                keep.append(item)
        for item in keep:
            self._queue.put(item)


# ------------------------------------------------------------------------------ the worker


class _Worker:
    """Owns the card context and handle; runs the queue in order on its own thread."""

    def __init__(self, card: PcscCard, emit: _Emitter) -> None:
        self.card = card
        self.emit = emit
        spec = card.spec
        self.share = SHARE_MODES[spec.share]
        self.shared = spec.share is Share.SHARED
        self.protocols = PROTOCOLS[spec.protocol]
        self.ctx: int | None = None
        self.h: int | None = None
        self.proto = 0
        self.reader: str | None = None
        #: the reader the monitor wants served (None: detached)
        self.want: str | None = None
        #: we said card_inserted and not card_removed since
        self.served = False
        #: the card failed (empty answer): wait for the monitor to see it change
        self.broken = False
        self.retry_at: float | None = None
        self.retry_delay = BACKOFF_FIRST
        #: seq of the last APDU that failed (compared with emit.last_seq by the probe)
        self.failed_seq: int | None = None
        self.thread = threading.Thread(target=self.run, name="ccidbridge-pcsc-card", daemon=True)

    # -- loop ---------------------------------------------------------------------------

    def run(self) -> None:
        get = self.card._queue.get
        card = self.card
        try:
            while True:
                if self.retry_at is None:
                    item = get()
                else:
                    try:
                        item = get(timeout=max(0.0, self.retry_at - time.monotonic()))
                    except queue.Empty:
                        self.retry_at = None
                        self._connect()
                        continue
                head = item[0]
                if card._stopping.is_set():
                    break
                try:
                    if head.__class__ is int:
                        self._transmit(head, item[1])  # type: ignore[arg-type]
                    else:
                        self._control(head, item[1])  # type: ignore[arg-type]
                except Exception as exc:  # noqa: BLE001 - the worker must survive a bug
                    self._unexpected(head, exc)
        finally:
            self._close()

    def _unexpected(self, head: object, exc: Exception) -> None:
        """A bug (ours, pyscard's, the sink's): say it, answer the APDU, keep going.

        Only the exception's type is reported: its text could quote APDU bytes.
        """
        self.emit.notice(
            f"card worker: unexpected {type(exc).__name__} (please report)", logging.ERROR
        )
        if head.__class__ is int and self.emit.last_seq != head:
            with contextlib.suppress(Exception):
                self.emit.done(head, None, f"internal error ({type(exc).__name__})")  # type: ignore[arg-type]

    def _transmit(self, seq: int, apdu: bytes) -> None:
        """The hot path: no allocation beyond the list pyscard needs, no status call."""
        h = self.h
        if h is None:
            self.emit.done(seq, None, NO_CARD)
            return
        if self.shared:
            hr = scard.SCardBeginTransaction(h)
            if hr != OK:
                self._apdu_failed(seq, hr)
                return
            hr, resp = scard.SCardTransmit(h, self.proto, list(apdu))
            scard.SCardEndTransaction(h, LEAVE)
        else:
            hr, resp = scard.SCardTransmit(h, self.proto, list(apdu))
        if hr == OK and len(resp) >= 2:
            self.emit.done(seq, bytes(resp), None)
        else:
            self._apdu_failed(seq, hr)

    def _control(self, op: str, arg: object) -> None:
        if op == _ATTACH:
            self.want = arg  # type: ignore[assignment]
            self.broken = False
            self._connect()
        elif op == _DETACH:
            self.want = None
            self.broken = False
            self.retry_at, self.retry_delay = None, BACKOFF_FIRST
            self._drop(str(arg))
        elif op == _POKE:
            if self.h is None and self.want is not None and not self.broken:
                self._connect()
        elif op == _PROBE:
            self._probe()
        elif op == _SERVICE:
            self.want = None
            self.retry_at, self.retry_delay = None, BACKOFF_FIRST
            self._drop(str(arg))
            self._release_ctx()

    # -- connecting ---------------------------------------------------------------------

    def _ensure_ctx(self) -> int | None:
        if self.ctx is None:
            hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if hr != OK:
                return None
            self.ctx = ctx
        return self.ctx

    def _connect(self) -> None:
        """Connect to the wanted reader, check the ATR (from SCardStatus), report it."""
        reader = self.want
        if reader is None or self.card.stopping:
            return
        if self.h is not None:
            if self.reader == reader:
                return
            self._drop("card moved")
        ctx = self._ensure_ctx()
        if ctx is None:
            self._schedule_retry()
            return
        hr, h, proto = scard.SCardConnect(ctx, reader, self.share, self.protocols)
        if hr != OK:
            self._connect_failed(reader, hr)
            return
        hr, _name, _state, _proto, atr = scard.SCardStatus(h)
        if hr != OK:
            scard.SCardDisconnect(h, LEAVE)
            self._connect_failed(reader, hr)
            return
        self.h, self.proto, self.reader = h, proto, reader
        self.retry_at, self.retry_delay = None, BACKOFF_FIRST
        if self.emit.forget(f"busy:{reader}"):
            self.emit.notice(f"{reader}: the other program let go of the card", logging.INFO)
        self._serve(bytes(atr))

    def _serve(self, atr: bytes) -> None:
        """Report the card (again) if its ATR is the one the spec asks for."""
        spec = self.card.spec
        if not atr_matches(atr, spec.atr, spec.atr_mask):
            self.emit.once(
                f"atr:{self.reader}:{atr.hex()}",
                f"{self.reader}: card ATR {hexatr(atr)} does not match the configured "
                "atr=; not serving it",
                logging.WARNING,
            )
            self._drop("ATR mismatch")
            self.want = None
            return
        self.served = True
        self.card._suspended = False
        self.emit.inserted(atr, self.reader or "")

    def _connect_failed(self, reader: str, hr: int) -> None:
        hr &= 0xFFFFFFFF
        if hr == E_SHARING:
            self.emit.once(
                f"busy:{reader}",
                f"{reader}: the card is in use by another program ({hr_name(hr)}); waiting",
                logging.WARNING,
            )
        elif hr == E_PROTO:
            self.emit.once(
                f"proto:{reader}",
                f"{reader}: the card does not speak protocol={self.card.spec.protocol.value} "
                f"({hr_name(hr)}); not serving it",
                logging.WARNING,
            )
            return  # until another card comes (the monitor re-attaches)
        elif hr in SERVICE_GONE:
            self._release_ctx()
        elif hr not in CARD_GONE and hr not in READER_GONE:
            self.emit.once(
                f"connect:{reader}:{hr}",
                f"{reader}: cannot connect to the card ({hr_text(hr)}); retrying",
                logging.WARNING,
            )
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self.retry_at = time.monotonic() + self.retry_delay
        self.retry_delay = min(self.retry_delay * 2, BACKOFF_MAX)

    # -- failures -----------------------------------------------------------------------

    def _apdu_failed(self, seq: int, hr: int) -> None:
        """Answer the APDU first, then deal with the card (slow path)."""
        self.failed_seq = seq
        if hr == OK:
            # rv=0 with an empty response: the card crashed (gotcha 11).
            self.emit.done(seq, None, NO_SW)
            self._card_failed("card failed")
            return
        self.emit.done(seq, None, hr_text(hr))
        self._after_error(hr & 0xFFFFFFFF)

    def _after_error(self, hr: int) -> None:
        if hr == W_RESET:
            self._reconnect_after_reset()
        elif hr in CARD_GONE:
            self._drop("card removed")
        elif hr in READER_GONE:
            self._drop("reader gone")
        elif hr in SERVICE_GONE:
            self._drop("pcscd stopped")
            self._release_ctx()
        elif self.h is not None:
            # E.g. SCARD_E_NOT_TRANSACTED: keep serving, unless the card is gone or reset.
            st = scard.SCardStatus(self.h)[0] & 0xFFFFFFFF
            if st in HANDLED:
                self._after_error(st)

    def _reconnect_after_reset(self, init: int = LEAVE) -> None:
        """Another program reset the card: SCardReconnect(LEAVE_CARD), report the ATR again.

        With ``init=SCARD_RESET_CARD`` (the probe's revival) we reset it ourselves.
        """
        h = self.h
        if h is None:
            return
        hr, proto = scard.SCardReconnect(h, self.share, self.protocols, init)
        if hr == OK:
            hr, _n, _s, _p, atr = scard.SCardStatus(h)
        if hr != OK:
            hr &= 0xFFFFFFFF
            if hr in HANDLED and hr != W_RESET:
                self._after_error(hr)
            else:
                self._card_failed(f"reconnect after a reset failed: {hr_text(hr)}")
            return
        self.proto = proto
        self._serve(bytes(atr))

    def _card_failed(self, reason: str) -> None:
        """No status word: the card is dead until the monitor sees it change."""
        self._drop(reason)
        self.broken = True

    def _drop(self, reason: str) -> None:
        """Disconnect (LEAVE_CARD) and report the card gone if it was served.

        No reconnect from here: pcscd's event counter moves on every insertion and
        removal, so the monitor always sees a new card and re-attaches it.
        """
        h, self.h = self.h, None
        if h is not None:
            scard.SCardDisconnect(h, LEAVE)
        if self.served:
            self.served = False
            if not self.card._suspended:  # the runtime already said it is gone
                self.emit.removed(reason)

    def _release_ctx(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            scard.SCardReleaseContext(ctx)

    # -- recheck ------------------------------------------------------------------------

    def _probe(self) -> None:
        """After recheck(): the worker is free again; if the card answers, serve it again.

        If the exchange the runtime gave up on ended in an error, the card is mute
        rather than slow: reset it (SCardReconnect with SCARD_RESET_CARD).  The guest
        was already told the card is gone, so to it this is just a re-insertion.
        """
        self.served = False
        if self.h is None:
            if self.want is not None and not self.broken:
                self._connect()
            return
        if self.failed_seq is not None and self.failed_seq == self.emit.last_seq:
            self._reconnect_after_reset(scard.SCARD_RESET_CARD)
            return
        hr, _n, _s, _p, atr = scard.SCardStatus(self.h)
        if hr == OK:
            self._serve(bytes(atr))
        else:
            self._after_error(hr & 0xFFFFFFFF)

    def _close(self) -> None:
        h, self.h = self.h, None
        if h is not None:
            scard.SCardDisconnect(h, LEAVE)
        self._release_ctx()


# ----------------------------------------------------------------------------- the monitor


class _ServiceLost(Exception):
    pass


class _Monitor:
    """Watches readers with SCardGetStatusChange on its own context; drives the worker."""

    def __init__(self, card: PcscCard, emit: _Emitter) -> None:
        self.card = card
        self.emit = emit
        self.spec = card.spec
        self._ctx: int | None = None
        self._ctx_lock = threading.Lock()
        self._down = False
        #: the reader whose card the worker was told to serve, and its event counter
        self.bound: str | None = None
        self.bound_state = 0
        #: the current context's view: readers, their (event state, ATR), the PnP state
        self.readers: list[str] = []
        self.states: dict[str, tuple[int, bytes]] = {}
        self.pnp: int | None = 0  # None: this pcscd does not know the PnP pseudo reader
        self.thread = threading.Thread(target=self.run, name="ccidbridge-pcsc-monitor", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------

    def run(self) -> None:
        stopping = self.card._stopping
        while not stopping.is_set():
            ctx = self._establish()
            if ctx is None:
                return
            try:
                self._watch(ctx)
            except _ServiceLost:
                pass
            except Exception as exc:  # noqa: BLE001 - keep watching whatever happened
                self.emit.notice(
                    f"reader monitor: unexpected {type(exc).__name__}: {exc} (please report)",
                    logging.ERROR,
                )
                stopping.wait(BACKOFF_MAX)
            finally:
                self._release()
            if not stopping.is_set():
                self._service_lost()

    def cancel_and_join(self, timeout: float) -> None:
        """SCardCancel until the thread ends (a cancel can land before the call starts)."""
        if self.thread is threading.current_thread():  # stop() from a notice() callback
            return
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            with self._ctx_lock:
                if self._ctx is not None:
                    scard.SCardCancel(self._ctx)
            self.thread.join(0.02)

    def _establish(self) -> int | None:
        """A new context; while pcscd is down, say so once and back off <= 1 s."""
        stopping = self.card._stopping
        delay = BACKOFF_FIRST
        while not stopping.is_set():
            hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if hr == OK:
                with self._ctx_lock:
                    if stopping.is_set():
                        scard.SCardReleaseContext(ctx)
                        return None
                    self._ctx = ctx
                if self._down:
                    self._down = False
                    self.emit.notice("pcscd is running again", logging.INFO)
                return ctx
            self._say_down()
            stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        return None

    def _say_down(self) -> None:
        if not self._down:
            self._down = True
            self.emit.notice("pcscd is not running; waiting", logging.WARNING)

    def _release(self) -> None:
        with self._ctx_lock:
            ctx, self._ctx = self._ctx, None
        if ctx is not None:
            scard.SCardReleaseContext(ctx)

    def _service_lost(self) -> None:
        """The context died with pcscd (notes §1): the worker's is dead too."""
        self.card.post(_SERVICE, "pcscd stopped")
        self.bound = None
        self._say_down()

    # -- watching -----------------------------------------------------------------------

    def _list(self, ctx: int) -> list[str]:
        hr, names = scard.SCardListReaders(ctx, [])
        if hr == E_NO_READERS:
            return []
        if hr != OK:
            if hr & 0xFFFFFFFF in SERVICE_GONE:
                raise _ServiceLost()
            return []
        return list(names)

    def _watch(self, ctx: int) -> None:
        """Block in GetStatusChange until something changes; re-evaluate; repeat."""
        stopping = self.card._stopping
        self.readers = self._list(ctx)
        self.states = {}
        self.pnp = 0
        self._evaluate(self.readers, self.states)
        while not stopping.is_set():
            query = [(r, self.states[r][0] if r in self.states else 0) for r in self._watched()]
            if self.pnp is not None:
                query.append((PNP_READER, self.pnp))
            hr, result = scard.SCardGetStatusChange(ctx, RESCAN_MS, query)
            hr &= 0xFFFFFFFF
            if hr == E_CANCELLED:
                continue
            rescan = self._apply(result) if hr == OK else self._failed_wait(ctx, hr)
            if rescan:
                self.readers = self._list(ctx)
                self.states = {r: s for r, s in self.states.items() if r in self.readers}
            self._evaluate(self.readers, self.states)

    def _watched(self) -> list[str]:
        """The readers worth a GetStatusChange slot: those the spec accepts (MAX_WATCHED)."""
        readers = [r for r in self.readers if reader_matches(self.spec, r)]
        if len(readers) > MAX_WATCHED:
            self.emit.once(
                "too-many",
                f"{len(readers)} readers match; PC/SC watches at most {MAX_WATCHED} at once, "
                f"so only the first {MAX_WATCHED} are used (name one with <reader name=...>)",
                logging.WARNING,
            )
            readers = readers[:MAX_WATCHED]
        return readers

    def _apply(self, result: list[tuple[str, int, list[int]]]) -> bool:
        """Remember each reader's new state; True if the reader list may have changed."""
        rescan = False
        for name, event, atr in result:
            event &= ~scard.SCARD_STATE_CHANGED  # never echo CHANGED back
            if name == PNP_READER:
                rescan = rescan or event != self.pnp
                self.pnp = event
            else:
                self.states[name] = (event, bytes(atr))
                rescan = rescan or bool(event & scard.SCARD_STATE_UNKNOWN)
        return rescan

    def _failed_wait(self, ctx: int, hr: int) -> bool:
        """GetStatusChange did not report a change; always rescan afterwards."""
        if hr in SERVICE_GONE:
            raise _ServiceLost()
        if hr in READER_GONE:  # one vanished meanwhile, or this pcscd has no PnP reader
            if self._list(ctx) == self.readers:
                self.pnp = None  # else it would fail at once forever: a busy loop
        elif hr != E_TIMEOUT:  # timeout is the fallback rescan; anything else is odd
            self.emit.once(
                f"gsc:{hr}", f"SCardGetStatusChange failed: {hr_text(hr)}", logging.WARNING
            )
            self.card._stopping.wait(BACKOFF_MAX)
        return True

    def _evaluate(self, readers: list[str], states: dict[str, tuple[int, bytes]]) -> None:
        """Keep serving the bound card while it stays; otherwise choose one."""
        bound = self.bound
        if bound is not None:
            event = states.get(bound, (0, b""))[0] if bound in readers else None
            if event is None or event & scard.SCARD_STATE_UNKNOWN:
                self._unbind("reader gone")
            elif not _present(event):
                self._unbind("card removed")
            elif event >> 16 != self.bound_state >> 16:
                self._unbind("card replaced")  # the counter moves only on insert/remove
            else:
                if event != self.bound_state:
                    self.bound_state = event
                    self.card.post(_POKE, bound)
                return
        self._choose(readers, states)

    def _unbind(self, reason: str) -> None:
        self.card.post(_DETACH, reason)
        self.bound = None

    def _choose(self, readers: list[str], states: dict[str, tuple[int, bytes]]) -> None:
        spec, emit = self.spec, self.emit
        candidates = [r for r in self._watched() if r in readers]
        if not candidates:
            what = describe_spec(spec) if (spec.name or spec.match) else "any PC/SC reader"
            emit.once("missing", f"{what} not found; waiting", logging.WARNING)
            return
        if emit.forget("missing"):
            emit.notice(f"found {', '.join(candidates)}", logging.INFO)
        for reader in candidates:
            event, atr = states.get(reader, (0, b""))
            if not _present(event):
                continue
            if not atr_matches(atr, spec.atr, spec.atr_mask):
                emit.once(
                    f"atr:{reader}:{atr.hex()}",
                    f"{reader}: card ATR {hexatr(atr)} does not match the configured atr=; "
                    "not serving it",
                    logging.WARNING,
                )
                continue
            emit.forget("nocard")
            self.bound, self.bound_state = reader, event
            self.card.post(_ATTACH, reader)
            return
        if states:
            emit.once("nocard", f"no card in {describe_spec(spec)}; waiting", logging.INFO)


__all__ = [
    "PcscCard",
    "PcscUnavailable",
    "ReaderInfo",
    "atr_matches",
    "hr_text",
    "list_readers",
    "reader_matches",
]
