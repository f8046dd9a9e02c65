"""The nine VSCard messages as small immutable values, and their encoding.

``encode(msg) -> bytes`` builds one whole frame.  ``decode(frame) -> Message``
validates a frame from :class:`~ccidbridge.protocol.decoder.FrameDecoder`
strictly: an unknown type, a payload length impossible for the type, or an
Init with a bad magic each raise their own
:class:`~ccidbridge.protocol.errors.VSCardError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, cast

from construct import ConstError, StreamError, TerminatedError

from ccidbridge.protocol.errors import BadMagic, BadPayloadLength, UnknownMessageType
from ccidbridge.protocol.wire import (
    HEADER_FORMAT,
    HEADER_SIZE,
    MINIMAL_READER_ID,
    PAYLOADS,
    UNDEFINED_READER_ID,
    VSCARD_MAGIC,
    VSCARD_VERSION,
    ErrorCode,
    MsgType,
    VSCMsgError,
    VSCMsgInit,
)

_header = struct.Struct(HEADER_FORMAT)


class RawFrame(NamedTuple):
    """A frame cut from the stream, not yet validated beyond its length.

    A tuple rather than a dataclass: one is made per frame on the APDU path.
    """

    type: int
    reader_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Init:
    """VSC_Init: magic "VSCD", version, capabilities (none are defined; send 0)."""

    TYPE: ClassVar[MsgType] = MsgType.INIT
    version: int = VSCARD_VERSION
    capabilities: tuple[int, ...] = (0,)
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Error:
    """VSC_Error: a status code.  QEMU's ack of every control message."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: int = ErrorCode.SUCCESS
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class ReaderAdd:
    """VSC_ReaderAdd with an optional UTF-8 name (QEMU ignores it)."""

    TYPE: ClassVar[MsgType] = MsgType.READER_ADD
    name: bytes = b""
    reader_id: int = UNDEFINED_READER_ID


@dataclass(frozen=True, slots=True)
class ReaderRemove:
    TYPE: ClassVar[MsgType] = MsgType.READER_REMOVE
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Atr:
    """VSC_ATR: a card was inserted or reset; the payload is its ATR."""

    TYPE: ClassVar[MsgType] = MsgType.ATR
    atr: bytes = b""
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class CardRemove:
    TYPE: ClassVar[MsgType] = MsgType.CARD_REMOVE
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Apdu:
    """VSC_APDU: a command (QEMU to bridge) or a response with SW1 SW2."""

    TYPE: ClassVar[MsgType] = MsgType.APDU
    data: bytes = b""
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Flush:
    TYPE: ClassVar[MsgType] = MsgType.FLUSH
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class FlushComplete:
    TYPE: ClassVar[MsgType] = MsgType.FLUSH_COMPLETE
    reader_id: int = MINIMAL_READER_ID


Message = Init | Error | ReaderAdd | ReaderRemove | Atr | CardRemove | Apdu | Flush | FlushComplete

_EMPTY: dict[MsgType, type[ReaderRemove | CardRemove | Flush | FlushComplete]] = {
    MsgType.READER_REMOVE: ReaderRemove,
    MsgType.CARD_REMOVE: CardRemove,
    MsgType.FLUSH: Flush,
    MsgType.FLUSH_COMPLETE: FlushComplete,
}


def frame(msg_type: int, reader_id: int, payload: bytes = b"") -> bytes:
    """One whole frame: header (``VSCMsgHeader``) + payload."""
    return _header.pack(msg_type, reader_id, len(payload)) + payload


def encode(msg: Message) -> bytes:
    """Build the frame for ``msg``."""
    t = msg.TYPE
    # TYPE names the class, which mypy cannot see: the casts say so.
    if t is MsgType.APDU:
        payload = cast(Apdu, msg).data
    elif t is MsgType.ATR:
        payload = cast(Atr, msg).atr
    elif t is MsgType.READER_ADD:
        payload = cast(ReaderAdd, msg).name
    elif t is MsgType.ERROR:
        payload = VSCMsgError.build({"code": cast(Error, msg).code})
    elif t is MsgType.INIT:
        init = cast(Init, msg)
        payload = VSCMsgInit.build({"version": init.version,
                                    "capabilities": list(init.capabilities)})
    else:
        payload = b""
    return _header.pack(t, msg.reader_id, len(payload)) + payload


def decode(raw: RawFrame) -> Message:
    """Validate ``raw`` against its type's declaration and return the message.

    The common case (APDU) is checked without construct: any payload length
    is legal for it.
    """
    t, rid, payload = raw.type, raw.reader_id, raw.payload
    if t == MsgType.APDU:
        return Apdu(payload, rid)
    try:
        msg_type = MsgType(t)
    except ValueError:
        raise UnknownMessageType(t) from None
    if msg_type is MsgType.ATR:
        return Atr(payload, rid)
    if msg_type is MsgType.READER_ADD:
        return ReaderAdd(payload, rid)
    if msg_type in _EMPTY:
        if payload:
            raise BadPayloadLength(msg_type.name, len(payload), "it carries no payload")
        return _EMPTY[msg_type](rid)
    if msg_type is MsgType.ERROR:
        if len(payload) != 4:
            raise BadPayloadLength("ERROR", len(payload), "it carries exactly 4 (the code)")
        return Error(VSCMsgError.parse(payload).code, rid)
    # INIT
    if len(payload) < 12 or len(payload) % 4:
        raise BadPayloadLength(
            "INIT", len(payload), "it carries magic, version and at least one capability word"
        )
    if payload[:4] != VSCARD_MAGIC:
        raise BadMagic(payload[:4])
    try:
        parsed = PAYLOADS[MsgType.INIT].parse(payload)
    except (ConstError, StreamError, TerminatedError) as exc:  # pragma: no cover - guarded above
        raise BadPayloadLength("INIT", len(payload), str(exc)) from None
    return Init(parsed.version, tuple(parsed.capabilities), rid)


__all__ = [
    "HEADER_SIZE",
    "Apdu",
    "Atr",
    "CardRemove",
    "Error",
    "Flush",
    "FlushComplete",
    "Init",
    "Message",
    "RawFrame",
    "ReaderAdd",
    "ReaderRemove",
    "decode",
    "encode",
    "frame",
]
