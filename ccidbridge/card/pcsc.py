"""The bridge's card side over pyscard's low-level ``smartcard.scard`` (pcsc-lite).

:class:`PcscCard` holds one card for one ``<reader>`` spec.  Its PC/SC
context and card handle belong to the bridge's APDU thread, which calls
:meth:`PcscCard.transmit` and :meth:`PcscCard.reports` directly: no queue and
no thread hand-off on the APDU path.  The reader monitor
(:mod:`ccidbridge.card.monitor`, its own thread and context) decides which
reader's card to serve and posts that into ``_inbox``; :meth:`reports`, on
the owner thread, acts on it.

pcsc-lite facts the code relies on (docs/pcsc-lite.md):

* the disposition is always SCARD_LEAVE_CARD (#P3: pyscard's high level
  unpowers the card);
* a handle is kept only after a successful connect (#P3: a failed connect's
  handle passed to SCardTransmit raises SystemError);
* a crashed card answers rv=0 with an EMPTY response, then
  SCARD_E_NOT_TRANSACTED, then the reader goes EMPTY (#P5);
* a hung card blocks SCardTransmit forever, SCardCancel does not help (#P5):
  the bridge's watchdog deals with that, then :meth:`PcscCard.revive`;
* a reset by another program shows up only as SCARD_W_RESET_CARD on our next
  call (#P4), answered with SCardReconnect (LEAVE_CARD) and the ATR again;
* another program letting go of the card wakes nothing (#P4), so a busy card
  is retried on a backoff capped at BACKOFF_MAX (plus a Poke when the monitor
  does see the reader's state move).

Nothing here logs APDU contents (PINs travel in VERIFY etc.).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from smartcard import scard

from ccidbridge.card import errors as pe
from ccidbridge.card.base import CardReport, Inserted, Removed, TransmitFailed
from ccidbridge.card.choice import Attach, Detach, Poke, atr_matches
from ccidbridge.card.monitor import Monitor, ServiceLost
from ccidbridge.protocol.atr import hexatr
from ccidbridge.spec import CardProtocol, ReaderSpec, Share

LEAVE = scard.SCARD_LEAVE_CARD
#: Backoff for retrying a connect (a busy card, a context pcscd refused).
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0

PROTOCOLS = {
    CardProtocol.ANY: scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
    CardProtocol.T0: scard.SCARD_PROTOCOL_T0,
    CardProtocol.T1: scard.SCARD_PROTOCOL_T1,
}
#: The PC/SC protocol in use, as the T number the session's rules speak of.
T_NUMBER = {scard.SCARD_PROTOCOL_T0: 0, scard.SCARD_PROTOCOL_T1: 1}
SHARE_MODES = {
    Share.EXCLUSIVE: scard.SCARD_SHARE_EXCLUSIVE,
    Share.SHARED: scard.SCARD_SHARE_SHARED,
}

NO_CARD = "no card"
NO_SW = "card returned no status word"

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


class PcscCard:
    """:class:`~ccidbridge.card.base.CardSide` over PC/SC, for one ``ReaderSpec``.

    Every attribute but ``_inbox`` belongs to the owner thread (the bridge's
    APDU thread); ``_inbox`` is a thread-safe queue the monitor posts into.
    """

    def __init__(self, spec: ReaderSpec, log: Log | None = None) -> None:
        self.spec = spec
        self._log: Log = log or logging.getLogger("ccidbridge.card")
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._wake: Callable[[], None] = lambda: None
        self._monitor: Monitor | None = None
        self._share = SHARE_MODES[spec.share]
        self._shared = spec.share is Share.SHARED
        self._protocols = PROTOCOLS[spec.protocol]
        self._ctx: int | None = None
        self._h: int | None = None
        self._proto = 0
        self._reader: str | None = None
        #: the reader the monitor wants served (None: detached)
        self._want: str | None = None
        #: Inserted was reported and Removed not since
        self._served = False
        #: the card failed (empty answer): wait for the monitor to see it change
        self._broken = False
        self._retry_at: float | None = None
        self._retry_delay = BACKOFF_FIRST
        self._said: set[str] = set()
        self._out: list[CardReport] = []
        self._stopped = False

    # -- CardSide ------------------------------------------------------------------------

    def start(self, wake: Callable[[], None]) -> None:
        if self._monitor is not None:
            raise RuntimeError("PcscCard.start() called twice")
        self._wake = wake
        self._monitor = Monitor(self.spec, self._post, self._log)
        self._monitor.start()

    def reports(self, now: float) -> list[CardReport]:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._control(item)
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._connect()
        out, self._out = self._out, []
        return out

    def next_due(self) -> float | None:
        return self._retry_at

    def transmit(self, apdu: bytes) -> bytes:
        """The hot path: no allocation beyond the list pyscard needs, no status call."""
        h = self._h
        if h is None:
            raise TransmitFailed(NO_CARD)
        if self._shared:
            hr = scard.SCardBeginTransaction(h)
            if hr != pe.OK:
                raise TransmitFailed(self._failed(hr))
            hr, resp = scard.SCardTransmit(h, self._proto, list(apdu))
            scard.SCardEndTransaction(h, LEAVE)
        else:
            hr, resp = scard.SCardTransmit(h, self._proto, list(apdu))
        if hr == pe.OK and len(resp) >= 2:
            return bytes(resp)
        raise TransmitFailed(self._failed(hr))

    def revive(self, failed: bool) -> None:
        """The exchange the bridge gave up on came back.  If it ended without an
        answer the card is mute rather than slow: reset it (SCardReconnect with
        SCARD_RESET_CARD).  The guest was told the card is gone, so to it this
        is a re-insertion."""
        self._served = False
        if self._h is None:
            if self._want is not None and not self._broken:
                self._connect()
            return
        if failed:
            self._reconnect(scard.SCARD_RESET_CARD)
            return
        hr, _n, _s, _p, atr = scard.SCardStatus(self._h)
        if hr == pe.OK:
            self._serve(bytes(atr))
        else:
            self._after_error(hr & 0xFFFFFFFF)

    def stop(self) -> None:
        """End the monitor, leave the card (LEAVE_CARD), release the context.

        Called on the owner thread; when a call is stuck in a hung card the
        handle is left to that call (the process is ending anyway).
        """
        if self._stopped:
            return
        self._stopped = True
        if self._monitor is not None:
            self._monitor.stop()
        h, self._h = self._h, None
        if h is not None:
            scard.SCardDisconnect(h, LEAVE)
        self._release_ctx()

    # -- the monitor's decisions -----------------------------------------------------

    def _post(self, item: object) -> None:
        """Monitor thread: hand a decision to the owner."""
        self._inbox.put(item)
        self._wake()

    def _control(self, item: object) -> None:
        match item:
            case Attach(reader):
                self._want = reader
                self._broken = False
                self._connect()
            case Detach(reason):
                self._want = None
                self._broken = False
                self._retry_at, self._retry_delay = None, BACKOFF_FIRST
                self._drop(reason)
            case Poke():
                if self._h is None and self._want is not None and not self._broken:
                    self._connect()
            case ServiceLost():
                self._want = None
                self._retry_at, self._retry_delay = None, BACKOFF_FIRST
                self._drop("pcscd stopped")
                self._release_ctx()

    # -- connecting ------------------------------------------------------------------

    def _once(self, key: str, message: str, level: int) -> None:
        if key not in self._said:
            self._said.add(key)
            self._log.log(level, "%s", message)

    def _forget(self, key: str) -> bool:
        if key in self._said:
            self._said.discard(key)
            return True
        return False

    def _ensure_ctx(self) -> int | None:
        if self._ctx is None:
            hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if hr != pe.OK:
                return None
            self._ctx = ctx
        return self._ctx

    def _connect(self) -> None:
        """Connect to the wanted reader, check the ATR (from SCardStatus), report it."""
        reader = self._want
        if reader is None or self._stopped:
            return
        if self._h is not None:
            if self._reader == reader:
                return
            self._drop("card moved")
        ctx = self._ensure_ctx()
        if ctx is None:
            self._schedule_retry()
            return
        hr, h, proto = scard.SCardConnect(ctx, reader, self._share, self._protocols)
        if hr != pe.OK:
            self._connect_failed(reader, hr)
            return
        hr, _name, _state, _proto, atr = scard.SCardStatus(h)
        if hr != pe.OK:
            scard.SCardDisconnect(h, LEAVE)
            self._connect_failed(reader, hr)
            return
        self._h, self._proto, self._reader = h, proto, reader
        self._retry_at, self._retry_delay = None, BACKOFF_FIRST
        if self._forget(f"busy:{reader}"):
            self._log.info("%s: the other program let go of the card", reader)
        self._serve(bytes(atr))

    def _serve(self, atr: bytes) -> None:
        """Report the card (again) if its ATR is the one the spec asks for."""
        spec = self.spec
        if not atr_matches(atr, spec.atr, spec.atr_mask):
            self._once(
                f"atr:{self._reader}:{atr.hex()}",
                f"{self._reader}: card ATR {hexatr(atr)} does not match the configured "
                "atr=; not serving it",
                logging.WARNING,
            )
            self._drop("ATR mismatch")
            self._want = None
            return
        self._served = True
        self._out.append(Inserted(atr, self._reader or "", T_NUMBER.get(self._proto)))

    def _connect_failed(self, reader: str, hr: int) -> None:
        hr &= 0xFFFFFFFF
        if hr == pe.E_SHARING:
            self._once(
                f"busy:{reader}",
                f"{reader}: the card is in use by another program ({pe.hr_name(hr)}); waiting",
                logging.WARNING,
            )
        elif hr == pe.E_PROTO:
            self._once(
                f"proto:{reader}",
                f"{reader}: the card does not speak protocol={self.spec.protocol.value} "
                f"({pe.hr_name(hr)}); not serving it",
                logging.WARNING,
            )
            return  # until another card comes (the monitor re-attaches)
        elif hr in pe.SERVICE_GONE:
            self._release_ctx()
        elif hr not in pe.CARD_GONE and hr not in pe.READER_GONE:
            self._once(
                f"connect:{reader}:{hr}",
                f"{reader}: cannot connect to the card ({pe.hr_text(hr)}); retrying",
                logging.WARNING,
            )
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, BACKOFF_MAX)

    # -- failures --------------------------------------------------------------------

    def _failed(self, hr: int) -> str:
        """An exchange failed: deal with the card, return the reason for the guest's APDU."""
        if hr == pe.OK:  # rv=0 with an empty response: the card crashed (#P5)
            self._drop("card failed")
            self._broken = True
            return NO_SW
        self._after_error(hr & 0xFFFFFFFF)
        return pe.hr_text(hr)

    def _after_error(self, hr: int) -> None:
        if hr == pe.W_RESET:
            self._reconnect(LEAVE)
        elif hr in pe.CARD_GONE:
            self._drop("card removed")
        elif hr in pe.READER_GONE:
            self._drop("reader gone")
        elif hr in pe.SERVICE_GONE:
            self._drop("pcscd stopped")
            self._release_ctx()
        elif self._h is not None:
            # E.g. SCARD_E_NOT_TRANSACTED: keep serving, unless the card is gone or reset.
            st = scard.SCardStatus(self._h)[0] & 0xFFFFFFFF
            if st in pe.HANDLED:
                self._after_error(st)

    def _reconnect(self, init: int) -> None:
        """SCardReconnect, then report the ATR again.  ``init`` is LEAVE_CARD after
        another program's reset, SCARD_RESET_CARD to revive a mute card."""
        h = self._h
        if h is None:
            return
        hr, proto = scard.SCardReconnect(h, self._share, self._protocols, init)
        if hr == pe.OK:
            hr, _n, _s, _p, atr = scard.SCardStatus(h)
        if hr != pe.OK:
            hr &= 0xFFFFFFFF
            if hr in pe.HANDLED and hr != pe.W_RESET:
                self._after_error(hr)
            else:
                self._drop(f"reconnect after a reset failed: {pe.hr_text(hr)}")
                self._broken = True
            return
        self._proto = proto
        self._serve(bytes(atr))

    def _drop(self, reason: str) -> None:
        """Disconnect (LEAVE_CARD) and report the card gone if it was served.

        No reconnect from here: pcscd's event counter moves on every insertion
        and removal, so the monitor sees a new card and attaches it again.
        """
        h, self._h = self._h, None
        if h is not None:
            scard.SCardDisconnect(h, LEAVE)
        if self._served:
            self._served = False
            self._out.append(Removed(reason))

    def _release_ctx(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            scard.SCardReleaseContext(ctx)


__all__ = ["PcscCard"]
