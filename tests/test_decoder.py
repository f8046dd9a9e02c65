"""The streaming decoder against malformed and hostile input."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.errors import FrameTooLarge, TruncatedStream, VSCardError
from ccidbridge.protocol.messages import decode
from ccidbridge.protocol.qemu import MAX_PAYLOAD_FROM_QEMU


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    header = struct.pack(">LLL", 7, 0, MAX_PAYLOAD_FROM_QEMU + 1)
    assert decoder.feed(header[:11]) == []
    with pytest.raises(FrameTooLarge) as exc:
        decoder.feed(header[11:])
    assert exc.value.length == MAX_PAYLOAD_FROM_QEMU + 1
    assert decoder.buffered == 0


def test_largest_legal_frame_passes() -> None:
    payload = bytes(MAX_PAYLOAD_FROM_QEMU)
    frames = FrameDecoder().feed(struct.pack(">LLL", 7, 0, len(payload)) + payload)
    assert len(frames) == 1 and frames[0].payload == payload


def test_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack(">LLL", 7, 0, 0xFFFFFFFF))
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack(">LLL", 1, 0, 0))


def test_frames_before_an_oversized_header_in_the_same_chunk_are_not_returned() -> None:
    good = struct.pack(">LLL", 6, 0, 0)
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(good + struct.pack(">LLL", 7, 0, 1 << 30))


def test_eof_inside_a_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\0\0\0\1\0\0")
    with pytest.raises(TruncatedStream):
        decoder.eof()
    FrameDecoder().eof()  # nothing buffered: fine


@settings(max_examples=10_000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(1, 256))
def test_garbage_never_raises_foreign_errors_nor_buffers_past_the_cap(
    chunks: list[bytes], cap: int
) -> None:
    """10k cases: random chunks of random bytes, with a small cap so that
    random length fields hit both sides of it."""
    decoder = FrameDecoder(max_payload=cap)
    try:
        for chunk in chunks:
            for raw in decoder.feed(chunk):
                assert len(raw.payload) <= cap
                with contextlib.suppress(VSCardError):
                    decode(raw)
            assert decoder.buffered < 12 + cap
    except VSCardError:
        pass


@settings(max_examples=2_000, deadline=None)
@given(
    st.integers(0, 20),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=80),
)
def test_any_typed_frame_decodes_or_raises_a_codec_error(
    msg_type: int, reader_id: int, payload: bytes
) -> None:
    raw_frames = FrameDecoder().feed(
        struct.pack(">LLL", msg_type, reader_id, len(payload)) + payload
    )
    try:
        msg = decode(raw_frames[0])
    except VSCardError:
        return
    assert msg_type == msg.TYPE and msg.reader_id == reader_id
