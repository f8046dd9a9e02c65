"""What every test card shares, without any transport: APDU and BER-TLV parsing,
command chaining, and how a T=1 card delivers its answer.

A card's logic is an :class:`Applet`: fed one C-APDU (bytes), it returns one
R-APDU (bytes).  Subclasses implement :meth:`Applet.handle`, which gets a whole
command (chained blocks already joined) and returns a :class:`Reply`; the base
class turns the reply into the bytes on the wire according to the Le rules
below, so those rules are stated once, here:

* Le present and the data fit: data + SW.
* Le present and the data are longer (a short Le of at most 256, or an
  extended Le smaller than the answer): the first Le bytes + ``61xx``; the rest
  is fetched with GET RESPONSE (``00 C0 00 00 Le``), as ISO 7816-4 §5.3.4 and
  every T=1 PIV/OpenPGP card do.  ``xx`` is the number of bytes still waiting
  (00 for 256 or more).
* Le absent (case 1/3 form of a command that has an answer): a *lenient* card
  (YubiKey-like) answers as if Le were 256; a *strict* card honours ISO
  7816-3's "no Le, no data" and answers the bare status word
  (docs/middleware-facts.md#M9).
* Command chaining (CLA bit 0x10, ISO 7816-4 §5.1.1): every block but the last
  is answered 9000; the last one runs the joined command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ccidbridge.protocol.tlv import read_tlv

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_SECURITY = 0x6982
SW_BLOCKED = 0x6983
SW_CONDITIONS = 0x6985
SW_WRONG_DATA = 0x6A80
SW_FUNC_NOT_SUPPORTED = 0x6A81
SW_NOT_FOUND = 0x6A82
SW_WRONG_P1P2 = 0x6A86
SW_REF_NOT_FOUND = 0x6A88
SW_CHAIN_LAST_EXPECTED = 0x6883
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00

INS_GET_RESPONSE = 0xC0
CLA_CHAINING = 0x10


def sw_bytes(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


@dataclass
class Apdu:
    """A parsed command APDU (short or extended).  ``le`` is None when absent; 0 means max."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int | None
    extended: bool = False

    @classmethod
    def parse(cls, raw: bytes) -> Apdu:
        if len(raw) < 4:
            raise ValueError("APDU shorter than 4 bytes")
        cla, ins, p1, p2 = raw[:4]
        body = raw[4:]
        if not body:
            return cls(cla, ins, p1, p2, b"", None)
        if len(body) == 1:
            return cls(cla, ins, p1, p2, b"", body[0] or 256)
        if body[0] != 0:  # short Lc
            lc = body[0]
            data = body[1 : 1 + lc]
            if len(data) != lc:
                raise ValueError("Lc longer than the data")
            rest = body[1 + lc :]
            if not rest:
                return cls(cla, ins, p1, p2, data, None)
            if len(rest) == 1:
                return cls(cla, ins, p1, p2, data, rest[0] or 256)
            raise ValueError("trailing bytes after short Le")
        # extended: 00 then 2-byte Lc or Le
        if len(body) == 3:
            n = int.from_bytes(body[1:3], "big")
            return cls(cla, ins, p1, p2, b"", n or 65536, True)
        lc = int.from_bytes(body[1:3], "big")
        data = body[3 : 3 + lc]
        if lc == 0 or len(data) != lc:
            raise ValueError("bad extended Lc")
        rest = body[3 + lc :]
        if not rest:
            return cls(cla, ins, p1, p2, data, None, True)
        if len(rest) == 2:
            n = int.from_bytes(rest, "big")
            return cls(cla, ins, p1, p2, data, n or 65536, True)
        raise ValueError("bad extended Le")

    def encode(self) -> bytes:
        """The short form when it fits, else the extended one (for tests and tools)."""
        head = bytes([self.cla, self.ins, self.p1, self.p2])
        ext = self.extended or len(self.data) > 255 or (self.le or 0) > 256
        if not ext:
            out = head
            if self.data:
                out += bytes([len(self.data)]) + self.data
            if self.le is not None:
                out += bytes([self.le & 0xFF])
            return out
        out = head + b"\x00"
        if self.data:
            out += len(self.data).to_bytes(2, "big") + self.data
        if self.le is not None:
            out += (self.le & 0xFFFF).to_bytes(2, "big")
        return out


# -- BER-TLV (ISO 7816-4 §5.2.2) -----------------------------------------------


def tag_bytes(tag: int) -> bytes:
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def tlv(tag: int, value: bytes) -> bytes:
    """One BER-TLV: tag (1-3 bytes as written), definite length (short, 81, 82)."""
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    elif n < 0x10000:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    else:
        raise ValueError("TLV value over 65535 bytes")
    return tag_bytes(tag) + length + value


def parse_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs at one level of ``data`` (the bridge's own BER-TLV reader,
    ccidbridge/protocol/tlv.py); ``ValueError`` on malformed input."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if data[i] in (0x00, 0xFF):  # padding between objects (ISO 7816-4)
            i += 1
            continue
        tag, start, end = read_tlv(data, i)  # TlvError is a ValueError
        out.append((tag, data[start:end]))
        i = end
    return out


def find_tlv(data: bytes, tag: int) -> bytes | None:
    """The value of the first ``tag`` at the top level of ``data``, or None."""
    for t, v in parse_tlv(data):
        if t == tag:
            return v
    return None


# -- PINs ----------------------------------------------------------------------

PIN_TRIES = 3


@dataclass
class Pin:
    """A PIN with its retry counter (ISO 7816-4 VERIFY semantics)."""

    value: bytes
    tries: int = PIN_TRIES

    def check(self, given: bytes) -> int:
        """9000 on a match (counter reset), else 63Cx with the tries left; 6983 once blocked."""
        if self.tries == 0:
            return SW_BLOCKED
        if given == self.value:
            self.tries = PIN_TRIES
            return SW_OK
        self.tries -= 1
        return 0x63C0 | self.tries


# -- the applet base -------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What a command produced: response data and the status word."""

    data: bytes = b""
    sw: int = SW_OK


def status(sw: int) -> Reply:
    return Reply(b"", sw)


@dataclass
class Applet:
    """Sans-IO card: ``process(c_apdu) -> r_apdu``; subclasses implement ``handle``.

    ``strict_le`` selects the Le rule for commands without Le (module
    docstring).  The transport (lab/cards/vpcd.py) calls ``power_on`` and
    ``power_off`` on vpcd's control messages and sends ``atr`` when asked.
    """

    atr: bytes = b""
    strict_le: bool = False
    powered: bool = False
    #: how many commands came extended, were joined from a chain, or answered 61xx
    extended_commands: int = 0
    chained_commands: int = 0
    answers_61xx: int = 0
    _pending: bytes = field(default=b"", repr=False)  # what GET RESPONSE hands out next
    _chain: Apdu | None = field(default=None, repr=False)

    def power_on(self) -> None:
        self.powered = True
        self._pending = b""
        self._chain = None
        self.reset()

    def power_off(self) -> None:
        self.powered = False
        self._pending = b""
        self._chain = None
        self.reset()

    def reset(self) -> None:
        """Forget the card's volatile state (selection, verified PINs)."""

    def handle(self, apdu: Apdu) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    def process(self, raw: bytes) -> bytes:
        try:
            apdu = Apdu.parse(raw)
        except ValueError:
            return sw_bytes(SW_WRONG_LENGTH)
        if apdu.ins == INS_GET_RESPONSE and not apdu.cla & 0x80:
            return self._get_response(apdu)
        self._pending = b""
        if apdu.cla & CLA_CHAINING:
            if self._chain is not None and (self._chain.ins, self._chain.p1, self._chain.p2) != (
                apdu.ins, apdu.p1, apdu.p2,
            ):  # fmt: skip
                self._chain = None
                return sw_bytes(SW_CHAIN_LAST_EXPECTED)
            if self._chain is None:
                self._chain = Apdu(apdu.cla & ~CLA_CHAINING, apdu.ins, apdu.p1, apdu.p2, b"", None)
            self._chain.data += apdu.data
            return sw_bytes(SW_OK)
        if self._chain is not None:
            chain, self._chain = self._chain, None
            if (chain.ins, chain.p1, chain.p2) != (apdu.ins, apdu.p1, apdu.p2):
                return sw_bytes(SW_CHAIN_LAST_EXPECTED)
            apdu = Apdu(apdu.cla, apdu.ins, apdu.p1, apdu.p2, chain.data + apdu.data, apdu.le,
                        apdu.extended)  # fmt: skip
            self.chained_commands += 1
        if apdu.extended:
            self.extended_commands += 1
        reply = self.handle(apdu)
        return self.deliver(reply, apdu.le)

    def deliver(self, reply: Reply, le: int | None) -> bytes:
        """The R-APDU for ``reply`` under the Le rules (module docstring)."""
        if not reply.data:
            return sw_bytes(reply.sw)
        if le is None:
            if self.strict_le:
                return sw_bytes(reply.sw)
            le = 256
        if len(reply.data) <= le:
            return reply.data + sw_bytes(reply.sw)
        head, self._pending = reply.data[:le], reply.data[le:]
        self.answers_61xx += 1
        return head + sw_bytes(0x6100 | min(len(self._pending), 256) & 0xFF)

    def _get_response(self, apdu: Apdu) -> bytes:
        if not self._pending:
            return sw_bytes(SW_CONDITIONS)
        data, self._pending = self._pending, b""
        return self.deliver(Reply(data), apdu.le if apdu.le is not None else 256)
