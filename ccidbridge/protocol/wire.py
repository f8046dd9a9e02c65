"""The VSCard wire format, declared as libcacard's ``vscard_common.h`` does.

Every frame is a 12-byte header and a payload::

    typedef struct VSCMsgHeader {
        uint32_t   type;        /* VSCMsgType, network byte order      */
        uint32_t   reader_id;   /* network byte order                  */
        uint32_t   length;      /* payload bytes, header not counted   */
        uint8_t    data[0];
    } VSCMsgHeader;

Byte order: every integer is big-endian **except the Init magic**, which both
QEMU and libcacard copy to the wire as the raw ASCII bytes ``"VSCD"``
(protocol/VSCARD.md#frames).  There is no padding, checksum or sequence number.

The construct declarations below are the single source of truth for the
layout; :mod:`ccidbridge.protocol.messages` turns them into typed messages.
Compiled versions of the declarations are used where measurement showed them
faster (``benchmarks/codec.py``).
"""

from __future__ import annotations

from enum import IntEnum

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    GreedyRange,
    Int32ub,
    Struct,
    Terminated,
)


class MsgType(IntEnum):
    """``VSCMsgType``; the direction is libcacard's (Client = bridge, Host = QEMU)."""

    INIT = 1  # Client <-> Host
    ERROR = 2  # Client <-> Host; also the Host's ack of every control message
    READER_ADD = 3  # Client -> Host
    READER_REMOVE = 4  # Client -> Host
    ATR = 5  # Client -> Host; card inserted *or* reset
    CARD_REMOVE = 6  # Client -> Host
    APDU = 7  # Client <-> Host
    FLUSH = 8  # Host -> Client
    FLUSH_COMPLETE = 9  # Client -> Host


class ErrorCode(IntEnum):
    """``VSCErrorCode`` (the header's misspelling of ALREADY is kept)."""

    SUCCESS = 0
    GENERAL_ERROR = 1
    CANNOT_ADD_MORE_READERS = 2
    CARD_ALREAY_INSERTED = 3


#: ``VSCARD_VERSION = MAKE_VERSION(0, 0, 2)``: 11 bits major, 11 middle, 10 minor.
VSCARD_VERSION = 2
#: ``VSCARD_MAGIC``: raw ASCII on the wire, never byte-swapped.
VSCARD_MAGIC = b"VSCD"
#: ``VSCARD_UNDEFINED_READER_ID``: the reader id QEMU puts on its Init.
UNDEFINED_READER_ID = 0xFFFFFFFF
#: ``VSCARD_MINIMAL_READER_ID``: the only reader QEMU ever talks about.
MINIMAL_READER_ID = 0

HEADER_SIZE = 12

# -- the declarations ---------------------------------------------------------

VSCMsgHeader = Struct(
    "type" / Int32ub,
    "reader_id" / Int32ub,
    "length" / Int32ub,
)

VSCMsgInit = Struct(
    "magic" / Const(VSCARD_MAGIC),  # raw bytes: no htonl
    "version" / Int32ub,
    "capabilities" / GreedyRange(Int32ub),  # "may grow"; count comes from length
    Terminated,
)

VSCMsgError = Struct(
    "code" / Int32ub,
    Terminated,
)

VSCMsgReaderAdd = Struct(
    "name" / GreedyBytes,  # optional UTF-8 reader name, no NUL, no length prefix
)

VSCMsgATR = Struct(
    "atr" / GreedyBytes,
)

VSCMsgAPDU = Struct(
    "data" / GreedyBytes,  # command APDU (Host->Client) or response + SW1 SW2
)

VSCMsgEmpty = Struct(Terminated)  # ReaderRemove, CardRemove, Flush, FlushComplete

#: Payload layout per message type.
PAYLOADS = {
    MsgType.INIT: VSCMsgInit,
    MsgType.ERROR: VSCMsgError,
    MsgType.READER_ADD: VSCMsgReaderAdd,
    MsgType.READER_REMOVE: VSCMsgEmpty,
    MsgType.ATR: VSCMsgATR,
    MsgType.CARD_REMOVE: VSCMsgEmpty,
    MsgType.APDU: VSCMsgAPDU,
    MsgType.FLUSH: VSCMsgEmpty,
    MsgType.FLUSH_COMPLETE: VSCMsgEmpty,
}

#: A whole frame, for documentation and for tests that parse vectors in one go.
VSCMsg = Struct(
    "header" / VSCMsgHeader,
    "payload" / Bytes(lambda ctx: ctx.header.length),
)

# Compiled forms (construct generates and execs Python source for these).
HeaderCodec = VSCMsgHeader.compile()


def _struct_format(declaration: Struct) -> str:
    """The ``struct`` format of a Struct made only of fixed-size integer fields.

    construct's compiled parser for the header costs ~2 µs a call, 40x a plain
    ``struct`` unpack (benchmarks/codec.py); the APDU path parses and builds a
    header per frame, so it uses this format, derived from the declaration
    above so that the two cannot drift apart (tests/test_wire.py checks it).
    """
    order = ""
    fmt = ""
    for field in declaration.subcons:
        fmtstr = field.subcon.fmtstr  # e.g. '>L'
        order = order or fmtstr[0]
        fmt += fmtstr[1:]
    return order + fmt


HEADER_FORMAT = _struct_format(VSCMsgHeader)  # '>LLL'
