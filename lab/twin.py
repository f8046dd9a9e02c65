"""QEMU 7.2's side of the chardev: a sans-IO twin for tests.

:class:`QemuDevice` behaves as Debian's QEMU 7.2.22 ``ccid-card-passthru``
behind ``usb-ccid`` was observed to behave (protocol/VSCARD.md#Q1 .. #Q16),
including its flaws, so that the bridge session can be tested against it
without sockets: the 64 KiB input buffer that rewinds only when a read ends on
a frame boundary (and wedges for good otherwise), a closed connection that
resets nothing, FIFO matching of answers to guest requests, silent dropping
of responses over 374 bytes, and the replies to every message type.

The guest side is a method call: :meth:`guest_transmit` is an XfrBlock, and
:attr:`answers` records what the guest got for each request.

``t1_reader=True`` models the usb-ccid of QEMU's development tree with
``x-t1-support`` on (dwProtocols = 3, docs/libvirt-facts.md#L33; in no release up to
11.1): a guest whose card's ATR offers T=1 negotiates T=1, and usb-ccid, still
at TPDU level, forwards its **T=1 blocks** verbatim.  The guest here does what
libccid does: an S(IFS request) first, then each command in an I-block with
alternating N(S).  Unverified against a real QEMU until one ships.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum

from ccidbridge.protocol.atr import AtrError
from ccidbridge.protocol.atr import parse as parse_atr
from ccidbridge.protocol.messages import frame
from ccidbridge.protocol.qemu import MAX_ATR, MAX_RESPONSE_TO_QEMU, QEMU_INPUT_BUFFER, check_atr
from ccidbridge.protocol.wire import (
    HEADER_FORMAT,
    HEADER_SIZE,
    MINIMAL_READER_ID,
    UNDEFINED_READER_ID,
    VSCARD_MAGIC,
    VSCARD_VERSION,
    ErrorCode,
    MsgType,
)

#: The ATR usb-ccid reports until the first good VSC_ATR (Athena's).
DEFAULT_ATR = bytes.fromhex("3BD518FF8091FE1FC38073C8211308")
#: QEMU reads its chardev in chunks of at most this many bytes.
READ_SIZE = 4096

_unpack = struct.Struct(HEADER_FORMAT).unpack_from
_INIT_REPLY = frame(
    MsgType.INIT, UNDEFINED_READER_ID, VSCARD_MAGIC + struct.pack(">LL", VSCARD_VERSION, 0)
)


class Outcome(Enum):
    """What the guest got for one XfrBlock."""

    RESPONSE = "response"  # a DataBlock with the bridge's answer
    FAILED = "failed"  # empty DataBlock, bStatus 0x40 (bridge sent VSC_Error)
    EMPTY = "empty"  # empty DataBlock, bStatus 0 (flushed by a re-sent ATR)
    LOST = "lost"  # discarded by CardRemove/ReaderRemove (ccid_reset)
    DROPPED = "dropped"  # answer over 374 bytes: QEMU 7.2 drops it, guest times out
    NO_CARD = "no card"  # answered at once by usb-ccid, never forwarded


@dataclass(frozen=True, slots=True)
class GuestAnswer:
    seq: int
    outcome: Outcome
    data: bytes = b""


class QemuDevice:
    """usb-ccid + ccid-card-passthru as QEMU 7.2 implements them."""

    def __init__(self, *, wait_on: bool = False, t1_reader: bool = False) -> None:
        self.wait_on = wait_on  # server=on,wait=on: Init sent at realize reaches the peer
        self.t1_reader = t1_reader  # usb-ccid offers T=0 and T=1 (x-t1-support=on)
        self._t1_ns = 0  # the guest's next I-block N(S)
        self._t1_ifs_sent = False
        self.connected = False
        self.wedged = False
        self.card_present = False
        self.atr = DEFAULT_ATR
        self.answers: list[GuestAnswer] = []
        self.stdout: list[str] = []  # QEMU's printf/DPRINTF lines
        self.stderr: list[str] = []  # QEMU's error_report lines
        self.received: list[tuple[int, int, bytes]] = []  # every frame handled
        self._buf = bytearray(QEMU_INPUT_BUFFER)
        self._pos = 0  # vscard_in_pos
        self._hdr = 0  # vscard_in_hdr
        self._backlog = bytearray()  # bytes in the socket QEMU has not read yet
        self._pending: deque[int] = deque()
        self._next_seq = 0
        self._out = bytearray()
        self._realized = False

    # -- the chardev -----------------------------------------------------------

    def connect(self) -> None:
        """A peer connected.  QEMU sends nothing, except its realize-time Init
        when it was started with wait=on (it waited for this peer)."""
        self.connected = True
        if self.wait_on and not self._realized:
            self._out += _INIT_REPLY
        self._realized = True

    def disconnect(self) -> None:
        """CHR_EVENT_CLOSED is ignored: the buffer, card and requests all stay."""
        self.connected = False
        self._backlog.clear()
        self._out.clear()

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Bytes from the bridge, as one burst in the socket."""
        if not self.connected:
            return
        self._backlog += data
        while self._backlog and not self.wedged:
            room = QEMU_INPUT_BUFFER - self._pos  # ccid_card_vscard_can_read
            if room == 0:
                self.wedged = True  # can_read stays 0: QEMU never reads again
                break
            n = min(room, READ_SIZE, len(self._backlog))
            self._buf[self._pos : self._pos + n] = self._backlog[:n]
            del self._backlog[:n]
            self._pos += n
            self._handle_complete_frames()
        if self._pos == QEMU_INPUT_BUFFER and not self.wedged:
            self.wedged = True

    def _handle_complete_frames(self) -> None:
        while self._pos - self._hdr >= HEADER_SIZE:
            msg_type, reader_id, length = _unpack(self._buf, self._hdr)
            end = self._hdr + HEADER_SIZE + length
            if end > self._pos:
                break
            payload = bytes(self._buf[self._hdr + HEADER_SIZE : end])
            self._hdr = end
            self.received.append((msg_type, reader_id, payload))
            self._handle(msg_type, reader_id, payload)
        if self._hdr == self._pos:  # rewound only on an exact frame boundary
            self._hdr = self._pos = 0

    def _reply_error(self, reader_id: int, code: int) -> None:
        if self.connected:
            self._out += frame(MsgType.ERROR, reader_id, struct.pack(">L", code))

    def _handle(self, msg_type: int, reader_id: int, payload: bytes) -> None:
        if msg_type == MsgType.INIT:
            if payload[:4] != VSCARD_MAGIC:
                self.stderr.append("wrong magic")
            if self.connected:
                self._out += _INIT_REPLY
        elif msg_type == MsgType.READER_ADD:
            self._reply_error(MINIMAL_READER_ID, ErrorCode.SUCCESS)
        elif msg_type == MsgType.READER_REMOVE:
            self._remove_card()
            self._reply_error(reader_id, ErrorCode.SUCCESS)
        elif msg_type == MsgType.ATR:
            if len(payload) > MAX_ATR:
                self.stderr.append("ATR size exceeds spec, ignoring")
                self._reply_error(reader_id, ErrorCode.GENERAL_ERROR)
            elif check_atr(payload) is not None:
                self.stderr.append("ATR is inconsistent, ignoring")
                self._reply_error(reader_id, ErrorCode.GENERAL_ERROR)
            else:
                self.atr = payload
                self._settle_all(Outcome.EMPTY)  # ccid_card_card_inserted
                self.card_present = True
                self._reply_error(reader_id, ErrorCode.SUCCESS)
        elif msg_type == MsgType.CARD_REMOVE:
            self._remove_card()
            self._reply_error(reader_id, ErrorCode.SUCCESS)
        elif msg_type == MsgType.APDU:
            if self._pending:
                seq = self._pending.popleft()
                if len(payload) > MAX_RESPONSE_TO_QEMU:
                    self.answers.append(GuestAnswer(seq, Outcome.DROPPED, payload))
                else:
                    self.answers.append(GuestAnswer(seq, Outcome.RESPONSE, payload))
        elif msg_type == MsgType.ERROR:
            if self._pending:
                self.answers.append(GuestAnswer(self._pending.popleft(), Outcome.FAILED))
        else:
            self.stdout.append(f"usb-ccid: chardev: unexpected message of type {msg_type:X}")
            self._reply_error(reader_id, ErrorCode.GENERAL_ERROR)

    def _remove_card(self) -> None:
        self.card_present = False
        self._settle_all(Outcome.LOST)

    def _settle_all(self, outcome: Outcome) -> None:
        while self._pending:
            self.answers.append(GuestAnswer(self._pending.popleft(), outcome))

    # -- the guest ------------------------------------------------------------------

    @property
    def guest_protocol(self) -> int:
        """What the guest negotiates: T=1 when the reader and the ATR both offer it."""
        if not self.t1_reader:
            return 0
        try:
            offered = parse_atr(self.atr).protocols
        except AtrError:
            return 0
        return 1 if 1 in offered else 0

    def guest_command(self, apdu: bytes) -> list[int]:
        """The guest's driver sends ``apdu`` in the negotiated protocol: as is under T=0;
        under T=1 an S(IFS request) before the first command, then an I-block.
        Returns the sequence numbers of the XfrBlocks."""
        if self.guest_protocol == 0:
            return [self.guest_transmit(apdu)]
        seqs = []
        if not self._t1_ifs_sent:
            self._t1_ifs_sent = True
            seqs.append(self.guest_transmit(_t1_block(0xC1, bytes([254]))))
        seqs.append(self.guest_transmit(_t1_block(self._t1_ns << 6, apdu)))
        self._t1_ns ^= 1
        return seqs

    def guest_transmit(self, apdu: bytes) -> int:
        """An XfrBlock from the guest; returns its sequence number.

        With no card it is answered at once (NO_CARD).  Otherwise it is queued
        and forwarded as VSC_APDU (reader id 0) — into the void when no peer
        is connected, where it stays pending until something settles it.
        """
        seq = self._next_seq
        self._next_seq += 1
        if not self.card_present:
            self.answers.append(GuestAnswer(seq, Outcome.NO_CARD))
            return seq
        self._pending.append(seq)
        if self.connected:
            self._out += frame(MsgType.APDU, MINIMAL_READER_ID, apdu)
        return seq

    @property
    def pending(self) -> int:
        """Guest requests forwarded and not yet answered."""
        return len(self._pending)

    def answer_for(self, seq: int) -> GuestAnswer | None:
        for answer in self.answers:
            if answer.seq == seq:
                return answer
        return None


def _t1_block(pcb: int, inf: bytes) -> bytes:
    """ISO/IEC 7816-3 §11.3: NAD 0, PCB, LEN, INF, LRC (XOR of the other bytes)."""
    head = bytes([0, pcb, len(inf)]) + inf
    lrc = 0
    for byte in head:
        lrc ^= byte
    return head + bytes([lrc])
