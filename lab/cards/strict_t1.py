"""A strict T=1 card: data only when the command carries Le, never 61xx.

ISO 7816-3 §12 (T=1) carries the APDU as it is, so the card sees whether Le is
there; a card that honours "no Le, no data" answers a case-4 command sent
without Le (the way a T=0 host stack sends it, docs/middleware-facts.md#M9) with a
bare status word.  This card does exactly that, everywhere:

==============  ==============================================================
SELECT   A4     P1=04 by AID F0 63 63 69 64 54 31 ("ccidT1"): FCI 6F {84 AID,
                A5 {50 label}} (30 bytes) with Le, else bare 9000; other AID
                → 6A82.  P1=00/02 by FID 3F00 / 0101: FCP with Le, else 9000
READ BIN B0     the selected 1024-byte EF 0101 (byte i = i & 0xFF), Le bytes
                from offset P1P2; no Le → bare 9000
GET CHAL 84     Le random bytes; no Le → 6700
INT AUTH 88     SHA-256 of the data (32 bytes, ``cryptography``) with Le,
                else bare 9000 — the plainest case-4 command
GET DATA CA     P1P2=0101: "ccidbridge strict T=1 card" with Le, else 9000
==============  ==============================================================

An answer longer than Le is cut to Le bytes with 9000 (a T=1 card has no
GET RESPONSE to offer), so this card never says 61xx.

Run: ``python -m lab.cards.strict_t1 --port P``; in-process:
``VpcdClient(port, StrictT1Card()).start()``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from ccidbridge.protocol.atr import tck
from lab.cards.apdu import (
    SW_INS_NOT_SUPPORTED,
    SW_NOT_FOUND,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Apdu,
    Applet,
    Reply,
    status,
    tlv,
)
from lab.cards.vpcd import CardSpec, card_main

AID = bytes.fromhex("F0636369645431")  # F0 + "ccidT1"
EF_FID = 0x0101
MF_FID = 0x3F00
EF_SIZE = 1024
DATA_0101 = b"ccidbridge strict T=1 card"
HIST = b"ccidT1strict"
_BODY = bytes([0xF0 | len(HIST)]) + bytes.fromhex("1300008131FE15") + HIST
#: T=1 only (TD1 = 81), IFSC 0xFE; historical bytes are plain text.
ATR = b"\x3b" + _BODY + bytes([tck(_BODY)])


def fci() -> bytes:
    return tlv(0x6F, tlv(0x84, AID) + tlv(0xA5, tlv(0x50, b"strict T=1 card")))


@dataclass
class StrictT1Card(Applet):
    """The card's logic (sans-IO)."""

    strict_le: bool = True
    selected_ef: int | None = None

    def __post_init__(self) -> None:
        self.atr = ATR

    def reset(self) -> None:
        self.selected_ef = None

    def deliver(self, reply: Reply, le: int | None) -> bytes:
        if le is not None and len(reply.data) > le:
            reply = Reply(reply.data[:le], reply.sw)  # never 61xx (module docstring)
        return super().deliver(reply, le)

    def handle(self, a: Apdu) -> Reply:
        if a.cla & 0xEF:
            return status(0x6E00)
        handler = {
            0xA4: self._select,
            0xB0: self._read_binary,
            0x84: self._challenge,
            0x88: self._internal_auth,
            0xCA: self._get_data,
        }.get(a.ins)
        return handler(a) if handler else status(SW_INS_NOT_SUPPORTED)

    def _select(self, a: Apdu) -> Reply:
        if a.p1 == 0x04:
            return Reply(fci()) if a.data == AID else status(SW_NOT_FOUND)
        if a.p1 in (0x00, 0x02) and len(a.data) == 2:
            fid = int.from_bytes(a.data, "big")
            if fid not in (MF_FID, EF_FID):
                return status(SW_NOT_FOUND)
            self.selected_ef = EF_FID if fid == EF_FID else None
            size = EF_SIZE if fid == EF_FID else 0
            return Reply(tlv(0x62, tlv(0x80, size.to_bytes(2, "big")) + tlv(0x83, a.data)))
        return status(SW_WRONG_P1P2)

    def _read_binary(self, a: Apdu) -> Reply:
        if self.selected_ef != EF_FID:
            return status(0x6986)
        offset = (a.p1 << 8) | a.p2
        if offset >= EF_SIZE:
            return status(0x6B00)
        n = min(a.le or 0, EF_SIZE - offset)
        return Reply(bytes((offset + i) & 0xFF for i in range(n)))

    def _challenge(self, a: Apdu) -> Reply:
        return Reply(os.urandom(a.le)) if a.le else status(SW_WRONG_LENGTH)

    def _internal_auth(self, a: Apdu) -> Reply:
        h = hashes.Hash(hashes.SHA256())
        h.update(a.data)
        return Reply(h.finalize())

    def _get_data(self, a: Apdu) -> Reply:
        if (a.p1, a.p2) != (0x01, 0x01):
            return status(0x6A88)
        return Reply(DATA_0101)


def spec() -> CardSpec:
    """How to run this card in-process or as a process (lab/cards/slot.py)."""
    return CardSpec("lab.cards.strict_t1", [], StrictT1Card)


def main(argv: list[str] | None = None) -> int:
    return card_main("lab.cards.strict_t1", __doc__, lambda _: StrictT1Card(), argv)


if __name__ == "__main__":
    sys.exit(main())
