"""The codec against the frames seen on real QEMU 7.2, and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccidbridge.protocol import errors, messages
from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.messages import (
    Apdu,
    Atr,
    CardRemove,
    Error,
    Flush,
    FlushComplete,
    Init,
    RawFrame,
    ReaderAdd,
    ReaderRemove,
    decode,
    encode,
)
from ccidbridge.protocol.wire import HEADER_FORMAT, HeaderCodec, VSCMsg, VSCMsgHeader
from tests import vectors

VSCARD = vectors.load("vscard")


def raw(frame: bytes) -> RawFrame:
    (one,) = FrameDecoder(max_payload=1 << 20).feed(frame)
    return one


@pytest.mark.parametrize("vector", [v for v in VSCARD if not v.codec_error], ids=str)
def test_vector_decodes_and_encodes_byte_exact(vector: vectors.Vector) -> None:
    msg = decode(raw(vector.frame))
    assert encode(msg) == vector.frame


@pytest.mark.parametrize("vector", [v for v in VSCARD if v.codec_error], ids=str)
def test_vector_that_is_invalid_raises_its_own_error(vector: vectors.Vector) -> None:
    error = getattr(errors, vector.codec_error)
    with pytest.raises(error):
        decode(FrameDecoder().feed(vector.frame)[0])


@pytest.mark.parametrize("vector", [v for v in VSCARD if v.reply], ids=str)
def test_replies_decode_and_encode_byte_exact(vector: vectors.Vector) -> None:
    assert encode(decode(raw(vector.reply))) == vector.reply


def test_known_messages_have_the_documented_values() -> None:
    by_name = {v.name: v for v in VSCARD}
    assert decode(raw(by_name["init"].frame)) == Init(2, (0,), 0)
    assert decode(raw(by_name["init-reply"].frame)) == Init(2, (0,), 0xFFFFFFFF)
    assert decode(raw(by_name["reader-add-named"].frame)) == ReaderAdd(b"Test Reader", 0xFFFFFFFF)
    assert decode(raw(by_name["atr-reader-5"].frame)).reader_id == 5
    assert decode(raw(by_name["client-error"].frame)) == Error(1)
    assert decode(raw(by_name["apdu-response"].frame)) == Apdu(b"\x90\x00")


def test_magic_is_raw_ascii_and_the_rest_big_endian() -> None:
    frame = encode(Init())
    assert frame[12:16] == b"VSCD"
    assert frame[16:20] == b"\0\0\0\2"
    assert frame[:4] == b"\0\0\0\1"


def test_header_struct_is_derived_from_the_construct_declaration() -> None:
    assert HEADER_FORMAT == ">LLL"
    for value in (0, 1, 7, 0xFFFFFFFF):
        fields = {"type": value, "reader_id": value ^ 0xFFFFFFFF, "length": value}
        built = VSCMsgHeader.build(fields)
        assert struct.pack(HEADER_FORMAT, *fields.values()) == built
        assert HeaderCodec.build(fields) == built
        assert HeaderCodec.parse(built) == VSCMsgHeader.parse(built)


def test_whole_frame_declaration_parses_vectors() -> None:
    for v in VSCARD:
        if v.codec_error == "FrameTooLarge":
            continue
        parsed = VSCMsg.parse(v.frame)
        assert parsed.header.length == len(parsed.payload) == len(v.frame) - 12


reader_ids = st.integers(0, 0xFFFFFFFF)
blobs = st.binary(max_size=600)
u32 = st.integers(0, 0xFFFFFFFF)

any_message = st.one_of(
    st.builds(Init, u32, st.lists(u32, min_size=1, max_size=4).map(tuple), reader_ids),
    st.builds(Error, u32, reader_ids),
    st.builds(ReaderAdd, blobs, reader_ids),
    st.builds(ReaderRemove, reader_ids),
    st.builds(Atr, blobs, reader_ids),
    st.builds(CardRemove, reader_ids),
    st.builds(Apdu, blobs, reader_ids),
    st.builds(Flush, reader_ids),
    st.builds(FlushComplete, reader_ids),
)


@given(any_message)
def test_every_type_round_trips(msg: messages.Message) -> None:
    frame = encode(msg)
    assert decode(raw(frame)) == msg
    assert struct.unpack_from(">L", frame, 8)[0] == len(frame) - 12


@given(st.lists(any_message, max_size=12), st.data())
def test_arbitrary_chunking_yields_the_same_messages(msgs: list, data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    got = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[start:cut])
        start = cut
    assert [decode(f) for f in got] == msgs
    assert decoder.buffered == 0


def test_one_byte_at_a_time() -> None:
    msgs = [Init(), ReaderAdd(b"r"), Atr(b"\x3b\x00"), Apdu(b"\x00\xa4\x04\x00"), CardRemove()]
    stream = b"".join(encode(m) for m in msgs)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert [decode(f) for f in got] == msgs
