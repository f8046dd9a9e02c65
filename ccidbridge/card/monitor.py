"""The reader monitor: one thread blocked in SCardGetStatusChange.

It owns its own PC/SC context (pcsc-lite serialises calls on one context, so
a blocked SCardGetStatusChange would stall transmits on it) and the
:class:`~ccidbridge.card.choice.ReaderChoice`.  It logs the choice's notices
itself and hands every other decision to ``post`` (the card side's inbox).
Nothing else in the program touches its state.

The wait is bounded (RESCAN_MS): a fallback rescan of the reader list, since
the PnP notification never fires with some drivers (docs/pcsc-lite.md#P2).
When pcscd goes away the context is dead for good (docs/pcsc-lite.md#P1):
release it, say so once, back off at most BACKOFF_MAX, establish a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from smartcard import scard

from ccidbridge.card import errors as pe
from ccidbridge.card.choice import ChoiceOutput, Notice, ReaderChoice
from ccidbridge.spec import ReaderSpec

PNP_READER = "\\\\?PnP?\\Notification"
#: GetStatusChange timeout: the fallback rescan of the reader list.
RESCAN_MS = 1000
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


class _ServiceLost(Exception):
    pass


class Monitor:
    """Watches the readers the spec can use; posts Attach/Detach/Poke/ServiceLost."""

    def __init__(
        self,
        spec: ReaderSpec,
        post: Callable[[object], None],
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.choice = ReaderChoice(spec)
        self._post = post
        self._log = log
        self._stopping = threading.Event()
        #: Guards ``_ctx`` between this thread and :meth:`stop` (SCardCancel).
        self._ctx_lock = threading.Lock()
        self._ctx: int | None = None
        # The rest is this thread's alone.
        self._readers: list[str] = []
        self._states: dict[str, tuple[int, bytes]] = {}
        self._pnp: int | None = 0  # None: this pcscd does not know the PnP pseudo reader
        self.thread = threading.Thread(target=self._run, name="ccidbridge-monitor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 0.5) -> None:
        """SCardCancel until the thread ends (a cancel can land before the call starts)."""
        self._stopping.set()
        if self.thread is threading.current_thread() or not self.thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            with self._ctx_lock:
                if self._ctx is not None:
                    scard.SCardCancel(self._ctx)
            self.thread.join(0.02)

    # -- the thread ------------------------------------------------------------------

    def _emit(self, outputs: Sequence[ChoiceOutput]) -> None:
        for out in outputs:
            if isinstance(out, Notice):
                self._log.log(out.level, "%s", out.message)
            else:
                self._post(out)

    def _run(self) -> None:
        stopping = self._stopping
        while not stopping.is_set():
            ctx = self._establish()
            if ctx is None:
                return
            try:
                self._watch(ctx)
            except _ServiceLost:
                pass
            except Exception as exc:  # noqa: BLE001 - keep watching whatever happened
                self._log.error("reader monitor: unexpected %s: %s (please report)",
                                type(exc).__name__, exc)
                stopping.wait(BACKOFF_MAX)
            finally:
                self._release()
            if not stopping.is_set():
                self._post(ServiceLost())
                self._emit(self.choice.service_down())

    def _establish(self) -> int | None:
        delay = BACKOFF_FIRST
        while not self._stopping.is_set():
            hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if hr == pe.OK:
                with self._ctx_lock:
                    if self._stopping.is_set():
                        scard.SCardReleaseContext(ctx)
                        return None
                    self._ctx = ctx
                self._emit(self.choice.service_up())
                return int(ctx)
            self._emit(self.choice.service_down())
            self._stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        return None

    def _release(self) -> None:
        with self._ctx_lock:
            ctx, self._ctx = self._ctx, None
        if ctx is not None:
            scard.SCardReleaseContext(ctx)

    def _list(self, ctx: int) -> list[str]:
        hr, names = scard.SCardListReaders(ctx, [])
        if hr == pe.E_NO_READERS:
            return []
        if hr != pe.OK:
            if hr & 0xFFFFFFFF in pe.SERVICE_GONE:
                raise _ServiceLost()
            return []
        return list(names)

    def _watch(self, ctx: int) -> None:
        """Block in GetStatusChange until something changes; re-evaluate; repeat."""
        choice = self.choice
        self._readers = self._list(ctx)
        self._states = {}
        self._pnp = 0
        self._emit(choice.evaluate(self._readers, self._states))
        while not self._stopping.is_set():
            states = self._states
            query = [(r, states[r][0] if r in states else 0) for r in choice.watched(self._readers)]
            if self._pnp is not None:
                query.append((PNP_READER, self._pnp))
            hr, result = scard.SCardGetStatusChange(ctx, RESCAN_MS, query)
            hr &= 0xFFFFFFFF
            if hr == pe.E_CANCELLED:
                continue
            rescan = self._apply(result) if hr == pe.OK else self._failed_wait(ctx, hr)
            if rescan:
                self._readers = self._list(ctx)
                self._states = {r: s for r, s in self._states.items() if r in self._readers}
            self._emit(choice.evaluate(self._readers, self._states))

    def _apply(self, result: list[tuple[str, int, list[int]]]) -> bool:
        """Remember each reader's new state; True if the reader list may have changed."""
        rescan = False
        for name, event, atr in result:
            event &= ~scard.SCARD_STATE_CHANGED  # never echo CHANGED back
            if name == PNP_READER:
                rescan = rescan or event != self._pnp
                self._pnp = event
            else:
                self._states[name] = (event, bytes(atr))
                rescan = rescan or bool(event & scard.SCARD_STATE_UNKNOWN)
        return rescan

    def _failed_wait(self, ctx: int, hr: int) -> bool:
        """GetStatusChange did not report a change; always rescan afterwards."""
        if hr in pe.SERVICE_GONE:
            raise _ServiceLost()
        if hr in pe.READER_GONE:  # one vanished meanwhile, or this pcscd has no PnP reader
            if self._list(ctx) == self._readers:
                self._pnp = None  # else it would fail at once forever: a busy loop
        elif hr != pe.E_TIMEOUT:  # timeout is the fallback rescan; anything else is odd
            self._emit(self.choice.notice_once(
                f"gsc:{hr}", f"SCardGetStatusChange failed: {pe.hr_text(hr)}", logging.WARNING
            ))
            self._stopping.wait(BACKOFF_MAX)
        return True


class ServiceLost:
    """Posted when pcscd went away: every context of ours is dead, the worker's too."""

    __slots__ = ()
