"""The bridge side of a VSCard connection, sans-IO.

:class:`BridgeSession` is fed bytes from QEMU (``receive_data``) and host
events (``send``: connection up/down, card inserted/removed, APDU answered,
shutting down).  It never touches a socket, a thread or a clock: what it wants
written comes out of ``data_to_send()``, what the runtime must do or may log
comes out of ``events()``.  One session object lives as long as the bridge
serves one card, across any number of connections.

Every rule QEMU 7.2 imposes on its peer (protocol/VSCARD.md#Q1 .. #Q16) is
enforced here:

R1  Init first on every connection; QEMU never sends one on connect, except
    the unsolicited one with ``wait=on``.  Any Init the peer sends, whenever,
    is tolerated.  (protocol/VSCARD.md#Q1, #Q2)
R2  Resync on every (re)connect: QEMU ignores a closed chardev, so the guest
    still "has" the old card and QEMU still holds the guest requests that were
    forwarded on the old connection.  Send ReaderRemove (drops them), then
    ReaderAdd, then the ATR if a card is present.  (protocol/VSCARD.md#Q3)
R3  One control message (ReaderAdd, ReaderRemove, ATR, CardRemove) in flight;
    the next goes out when QEMU's VSC_Error ack for it arrives.  Long
    pipelined bursts can wedge QEMU's input buffer.  (protocol/VSCARD.md#Q4, #Q5)
R4  Every frame leaves whole, and no frame leaves larger than
    qemu.MAX_FRAME_TO_QEMU.  (protocol/VSCARD.md#Q4)
R5  Every guest APDU is answered exactly once, in arrival order: QEMU matches
    answers to requests FIFO and has no timeout.  A request the card cannot
    serve is answered with VSC_Error, which fails it at once in the guest.
    (protocol/VSCARD.md#Q6)
R6  Before an ATR, CardRemove or ReaderRemove leaves, the APDUs still pending
    are failed with VSC_Error: QEMU settles pending requests itself when it
    processes those messages, so a later answer would be matched to the next
    request.  For the same reason an APDU that arrives while such a message
    is in flight (the "fence") was already settled by QEMU and is dropped.
    (protocol/VSCARD.md#Q7)
R7  No response longer than qemu.MAX_RESPONSE_TO_QEMU leaves: longer ones
    are served as 61xx + GET RESPONSE (chaining.py).  (protocol/VSCARD.md#Q8)
R8  QEMU's Error on an ATR means the guest sees no card; it is surfaced as
    AtrRefused with the reason.  A T=1-only ATR is rewritten to announce T=0
    for QEMU's T=0-only reader, unless switched off.  (protocol/VSCARD.md#Q9, #Q10)
R9  A peer that breaks the protocol gets PeerProtocolError: the runtime must
    drop that connection; the session is ready for the next one.
R10 A removal must be visible to the guest: no ATR leaves within
    qemu.REINSERT_PAUSE of a CardRemove or ReaderRemove (every resync starts
    with one), and a card reset (a new ATR while QEMU holds a card) is shown
    as CardRemove, pause, ATR.  Else the guest's pcscd misses the blip and
    keeps using a card whose state was lost.  The session has no clock: when
    a removal leaves it emits HoldAtr(token, seconds), and the runtime
    answers ReleaseAtr(token) when the time is up.  (protocol/VSCARD.md#Q14)
R11 A guest payload that is a T=1 block, not an APDU (a guest that negotiated
    T=1 with a usb-ccid offering it), is refused with VSC_Error and never
    reaches the card (t1.py).

What the card says about itself is adapted to QEMU's T=0 short-APDU reader
by the presentation rules P1..P3 (presentation.py), applied at two points:
each guest APDU on its way to the card, and each card answer on its way to
the guest (before R7).  The ATR is R8's alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from enum import Enum

from ccidbridge.protocol import chaining, events, t1
from ccidbridge.protocol.atr import AtrError, announce_t0
from ccidbridge.protocol.atr import parse as parse_atr
from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.errors import LocalProtocolError, UnexpectedDirection, VSCardError
from ccidbridge.protocol.events import InputEvent, OutputEvent
from ccidbridge.protocol.messages import (
    Atr,
    CardRemove,
    Error,
    Flush,
    FlushComplete,
    Init,
    Message,
    ReaderAdd,
    ReaderRemove,
    decode,
    encode,
    frame,
)
from ccidbridge.protocol.presentation import Presentation
from ccidbridge.protocol.qemu import (
    MAX_FRAME_TO_QEMU,
    MAX_READER_NAME,
    MAX_RESPONSE_TO_QEMU,
    READER_PROTOCOLS,
    REINSERT_PAUSE,
    check_atr,
)
from ccidbridge.protocol.wire import MINIMAL_READER_ID, ErrorCode, MsgType

_CARD_STATE = (MsgType.ATR, MsgType.CARD_REMOVE, MsgType.READER_REMOVE)
_APDU_ERROR = encode(Error(ErrorCode.GENERAL_ERROR))  # fails one guest request (R5)
_APDU = MsgType.APDU


class State(Enum):
    DISCONNECTED = "disconnected"  # no connection; card events are only remembered
    SYNCING = "syncing"  # Init + resync sent, acks outstanding
    READY = "ready"  # QEMU knows the reader and the card state
    CLOSING = "closing"  # Shutdown: farewell messages outstanding
    CLOSED = "closed"  # nothing more will be sent


class BridgeSession:
    """One served card's VSCard conversation with QEMU (see module docstring)."""

    def __init__(
        self,
        reader_name: str = "",
        *,
        rewrite_atr: bool = True,
        chain_long_responses: bool = True,
        reinsert_pause: float = REINSERT_PAUSE,
        keep: frozenset[str] = frozenset(),
    ) -> None:
        """``keep``: presentation rules switched off (presentation.RULES, or "all")."""
        self._reader_name = reader_name.encode("utf-8")[:MAX_READER_NAME]
        self._rewrite_atr = rewrite_atr
        self._chain_long = chain_long_responses
        self._reinsert_pause = reinsert_pause
        self._hold_token = 0
        self.state = State.DISCONNECTED
        self._atr: bytes | None = None  # the host card's ATR; None = no card
        self._events: deque[events.OutputEvent] = deque()
        self._presentation = Presentation(keep, self._events.append)
        self._next_seq = 0  # sequence numbers never repeat, across connections
        self._reset_connection()

    # -- per-connection state ------------------------------------------------

    def _reset_connection(self) -> None:
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._queue: deque[Message] = deque()  # control messages not yet sent (R3)
        self._in_flight: Message | None = None
        self._fenced = False  # a card-state message is in flight (R6)
        self._qemu_atr: bytes | None = None  # the ATR QEMU acked, if any
        self._pending: deque[int] = deque()  # guest requests given to the runtime (R5)
        self._presentation.forget()  # the requests the presentation rules look at
        self._early: dict[int, bytes] = {}  # answers that arrived out of order
        self._chain: chaining.ResponseChain | None = None
        self._flush_requested = False
        self._broken = False
        self._atr_held = False  # R10: an ATR waits for ReleaseAtr

    # -- the runtime's interface --------------------------------------------------

    @property
    def card_present(self) -> bool:
        return self._atr is not None

    def data_to_send(self) -> bytes:
        """Bytes to write to the current connection, whole frames only (R4)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def events(self) -> Iterator[OutputEvent]:
        """Drain the output events, oldest first."""
        while self._events:
            yield self._events.popleft()

    def handle(self, event: InputEvent) -> None:
        """Tell the session what happened on the host side."""
        match event:
            case events.ApduResponse(seq, data):
                self._answer(seq, data)
            case events.ApduFailed(seq, _):
                self._answer(seq, None)
            case events.CardInserted(atr, protocol):
                self._atr = bytes(atr)
                self._presentation.card(self._atr, protocol)
                if self._connected:
                    self._announce_card()
            case events.CardRemoved():
                self._atr = None
                if self._connected:
                    self._announce_card()
            case events.ConnectionOpened():
                self._open()
            case events.ConnectionClosed():
                self._closed()
            case events.Shutdown():
                self._shutdown()
            case events.ReleaseAtr(token):
                if self._atr_held and token == self._hold_token:
                    self._atr_held = False
                    if self._connected and self._atr is not None:
                        self._announce_card()
                    self._maybe_synchronized()
            case _:
                raise LocalProtocolError(f"not a session input event: {type(event).__name__}")

    def receive_data(self, data: bytes) -> None:
        """Bytes arrived from QEMU."""
        if self._broken or not self._connected_or_closing:
            return
        try:
            frames = self._decoder.feed(data)
            for raw in frames:
                if raw.type == _APDU:  # the hot path: skip the generic decode
                    self._on_apdu(raw.payload)
                else:
                    self._on_message(decode(raw))
        except VSCardError as exc:
            self._fail_connection(exc)

    # -- connection lifecycle --------------------------------------------------

    @property
    def _connected(self) -> bool:
        return self.state in (State.SYNCING, State.READY)

    @property
    def _connected_or_closing(self) -> bool:
        return self.state in (State.SYNCING, State.READY, State.CLOSING)

    def _open(self) -> None:
        if self.state is State.CLOSED:
            raise LocalProtocolError("the session is closed")
        self._reset_connection()
        self.state = State.SYNCING
        self._emit_now(Init())  # R1
        self._queue.append(ReaderRemove())  # R2: forget the old connection's requests
        self._queue.append(ReaderAdd(self._reader_name))
        if self._atr is not None and self._reinsert_pause <= 0:
            self._queue.append(self._atr_message(self._atr))
        # else: the ATR follows ReleaseAtr for the ReaderRemove's hold (R10)
        self._pump()

    def _closed(self) -> None:
        closing = self.state is State.CLOSING
        if not self._broken:
            try:
                self._decoder.eof()  # a peer that died mid-frame: say so (R9)
            except VSCardError as exc:
                self._events.append(events.PeerProtocolError(exc))
        self._reset_connection()
        if closing:
            self.state = State.CLOSED
            self._events.append(events.ShutdownComplete())
        elif self.state is not State.CLOSED:
            self.state = State.DISCONNECTED

    def _shutdown(self) -> None:
        if self.state is State.CLOSED or self.state is State.CLOSING:
            return
        if not self._connected:
            self.state = State.CLOSED
            self._events.append(events.ShutdownComplete())
            return
        self.state = State.CLOSING
        self._chain = None
        self._queue.clear()
        if self._qemu_card_after_queue() is not None:
            self._queue.append(CardRemove())
        self._queue.append(ReaderRemove())
        self._pump()

    def _fail_connection(self, exc: VSCardError) -> None:
        self._broken = True
        self._out.clear()
        self._events.append(events.PeerProtocolError(exc))

    # -- control messages (R3, R6) ---------------------------------------------

    def _atr_message(self, atr: bytes) -> Atr:
        """The VSC_ATR for the host card's ``atr``, rewritten for T=0 if need be (R8)."""
        if self._rewrite_atr:
            try:
                offered = parse_atr(atr).protocols
            except AtrError:
                offered = READER_PROTOCOLS  # unparsable: pass it on as it is
            if not offered & READER_PROTOCOLS:
                sent = announce_t0(atr)
                self._events.append(
                    events.AtrRewritten(
                        atr,
                        sent,
                        "the card offers only T="
                        + "/".join(str(p) for p in sorted(offered))
                        + " and QEMU's usb-ccid reader speaks only T=0",
                    )
                )
                return Atr(sent)
        return Atr(atr)

    def _qemu_card_after_queue(self) -> bytes | None:
        """The ATR QEMU will hold once every queued control message is processed."""
        state = self._qemu_atr
        for msg in (self._in_flight, *self._queue):
            if isinstance(msg, Atr):
                state = msg.atr
            elif isinstance(msg, CardRemove | ReaderRemove):
                state = None
        return state

    def _announce_card(self) -> None:
        """Queue what brings QEMU to the host card's current state."""
        # ATRs not sent yet are superseded by this state; removals never are (R10).
        self._queue = deque(m for m in self._queue if not isinstance(m, Atr))
        removal_queued = any(isinstance(m, CardRemove | ReaderRemove) for m in self._queue)
        if self._atr is not None:
            if self._atr_held or removal_queued:
                pass  # ReleaseAtr announces the card as it is then
            elif self._qemu_card_after_queue() is not None and self._reinsert_pause > 0:
                self._queue.append(CardRemove())  # a reset: removal, pause, ATR
            else:
                self._queue.append(self._atr_message(self._atr))
        elif self._qemu_card_after_queue() is not None and not removal_queued:
            self._queue.append(CardRemove())
        self._pump()

    def _pump(self) -> None:
        if self._in_flight is not None or not self._queue:
            return
        msg = self._queue.popleft()
        if msg.TYPE in _CARD_STATE:
            self._fail_pending(f"{type(msg).__name__} is going to QEMU")  # R6
            self._chain = None
            self._fenced = True
            if msg.TYPE is not MsgType.ATR and self._reinsert_pause > 0:  # R10
                self._atr_held = True
                self._hold_token += 1
                self._events.append(events.HoldAtr(self._hold_token, self._reinsert_pause))
        self._in_flight = msg
        self._emit_now(msg)

    def _on_ack(self, msg: Error) -> None:
        acked = self._in_flight
        if acked is None:
            self._events.append(
                events.UnexpectedMessage(f"VSC_Error({msg.code}) with no control message in flight")
            )
            return
        self._in_flight = None
        self._fenced = False
        ok = msg.code == ErrorCode.SUCCESS
        if isinstance(acked, Atr):
            if ok:
                self._qemu_atr = acked.atr
                self._events.append(events.AtrAccepted(acked.atr))
            else:
                self._qemu_atr = None
                reason = check_atr(acked.atr) or f"QEMU answered VSC_Error({msg.code})"
                self._events.append(events.AtrRefused(acked.atr, reason))
        elif isinstance(acked, CardRemove | ReaderRemove):
            self._qemu_atr = None
        if not ok and not isinstance(acked, Atr):
            self._events.append(events.ControlRefused(type(acked).__name__, msg.code))
        self._pump()
        if self._in_flight is None and self.state is State.CLOSING:
            self.state = State.CLOSED
            self._events.append(events.ShutdownComplete())
        self._maybe_synchronized()

    def _maybe_synchronized(self) -> None:
        """SYNCING ends when every resync message is acked and no ATR is held."""
        if (
            self.state is State.SYNCING
            and self._in_flight is None
            and not self._queue
            and not self._atr_held
        ):
            self.state = State.READY
            self._events.append(events.Synchronized(self._qemu_atr is not None))

    # -- messages from QEMU ----------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        match msg:
            case Error():
                self._on_ack(msg)
            case Init(version, capabilities):
                self._events.append(events.PeerInit(version, capabilities))  # R1
            case Flush():
                self._flush_requested = True
                self._maybe_flush_complete()
            case _:
                raise UnexpectedDirection(type(msg).__name__)

    def _on_apdu(self, apdu: bytes) -> None:
        if self._fenced:  # R6
            self._events.append(events.StaleApduDropped(apdu))
            return
        if self._chain is not None:
            chain, self._chain = self._chain, None
            if chaining.is_get_response(apdu):
                part = chain.next_part(chaining.requested_length(apdu))
                if chain.remaining:
                    self._chain = chain
                self._events.append(events.ApduAnsweredLocally(apdu, len(part)))
                if self._pending:  # R5: in arrival order, behind older requests
                    seq = self._next_seq
                    self._next_seq = seq + 1
                    self._pending.append(seq)
                    self._early[seq] = part
                else:
                    self._emit_apdu_answer(part)
                return
        if (why := t1.refusal(apdu)) is not None:  # R11
            self._events.append(events.ApduRefused(apdu, why))
            self._out += _APDU_ERROR
            return
        if self._qemu_atr is None or self.state is State.CLOSING:
            self._events.append(events.ApduRefused(apdu, "no card is announced to QEMU"))
            self._out += _APDU_ERROR
            return
        seq = self._next_seq
        self._next_seq = seq + 1
        self._pending.append(seq)
        self._events.append(events.TransmitApdu(seq, self._presentation.command(seq, apdu)))

    # -- answers (R5, R7) --------------------------------------------------------

    def _answer(self, seq: int, data: bytes | None) -> None:
        pending = self._pending
        if not pending or seq < pending[0] or seq not in pending:
            self._events.append(events.LateResponseDropped(seq))
            return
        if seq != pending[0]:
            self._early[seq] = data if data is not None else b""
            return
        self._write_answer(seq, data)
        pending.popleft()
        while pending and pending[0] in self._early:
            nxt = pending.popleft()
            early = self._early.pop(nxt)
            self._write_answer(nxt, early or None)
        if self._flush_requested:
            self._maybe_flush_complete()

    def _write_answer(self, seq: int, data: bytes | None) -> None:
        if data is None or len(data) < 2:  # no status word: not an answer
            self._presentation.forget(seq)
            self._out += _APDU_ERROR
            return
        answer = self._presentation.response(seq, data)
        data = answer.data
        if answer.defer:  # P3: as a T=0 card, 61xx first
            first, self._chain = chaining.defer(data)
            self._emit_apdu_answer(first)
            return
        if len(data) > MAX_RESPONSE_TO_QEMU:
            if not self._chain_long:
                self._events.append(
                    events.ApduRefused(b"", f"response of {len(data)} bytes exceeds QEMU's cap")
                )
                self._out += _APDU_ERROR
                return
            first, self._chain = chaining.split(data)
            self._events.append(events.ResponseChained(seq, len(data)))
            data = first
        self._emit_apdu_answer(data)

    def _emit_apdu_answer(self, data: bytes) -> None:
        self._out += frame(_APDU, MINIMAL_READER_ID, data)

    def _fail_pending(self, reason: str) -> None:
        self._presentation.forget()
        while self._pending:
            seq = self._pending.popleft()
            self._events.append(events.PendingFailed(seq, reason))
            self._out += _APDU_ERROR
        self._early.clear()

    def _maybe_flush_complete(self) -> None:
        if not self._pending:
            self._flush_requested = False
            self._emit_now(FlushComplete())

    def _emit_now(self, msg: Message) -> None:
        data = encode(msg)
        assert len(data) <= MAX_FRAME_TO_QEMU  # R4: control frames are tiny by construction
        self._out += data


__all__ = ["BridgeSession", "State"]
