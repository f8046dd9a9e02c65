"""Streaming frame decoder: feed arbitrary chunks, get whole frames.

TCP and Unix sockets deliver a byte stream: one frame may arrive a byte at a
time, and one read may carry many frames.  The decoder buffers at most one
frame's worth of bytes: a header that declares more payload than
``max_payload`` is refused from its 12 bytes alone, before anything of the
payload is kept (:class:`FrameTooLarge`).  After an error the decoder is
poisoned: the stream has no resynchronisation point, so the only remedy is a
new connection.
"""

from __future__ import annotations

import struct

from ccidbridge.protocol.errors import FrameTooLarge, TruncatedStream, VSCardError
from ccidbridge.protocol.messages import RawFrame
from ccidbridge.protocol.qemu import MAX_PAYLOAD_FROM_QEMU
from ccidbridge.protocol.wire import HEADER_FORMAT, HEADER_SIZE

_unpack_header = struct.Struct(HEADER_FORMAT).unpack_from


class FrameDecoder:
    """Cut a VSCard byte stream into :class:`RawFrame` values."""

    __slots__ = ("_buf", "_max_payload", "_failed")

    def __init__(self, max_payload: int = MAX_PAYLOAD_FROM_QEMU) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._failed: VSCardError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[RawFrame]:
        """Add ``data``; return every frame it completes, in order.

        Raises :class:`FrameTooLarge` as soon as an oversized header is
        complete, even if the same chunk also completed earlier frames (those
        are lost with the connection anyway).
        """
        if self._failed is not None:
            raise self._failed
        if type(data) is not bytes:
            data = bytes(data)
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf = bytearray()
        frames: list[RawFrame] = []
        pos = 0
        end = len(data)
        limit = self._max_payload
        while end - pos >= HEADER_SIZE:
            msg_type, reader_id, length = _unpack_header(data, pos)
            if length > limit:
                self._failed = FrameTooLarge(length, limit)
                raise self._failed
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            frames.append(RawFrame(msg_type, reader_id, data[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            self._buf = bytearray(data[pos:])
        return frames

    def eof(self) -> None:
        """The stream ended; complain if it ended inside a frame."""
        if self._buf:
            buffered = len(self._buf)
            self._buf = bytearray()
            raise TruncatedStream(buffered)
