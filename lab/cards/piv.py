"""A PIV card (NIST SP 800-73-4) that OpenSC's ``PIV-II`` driver and ``pkcs11-tool``
accept, with a real ECC P-256 key in slot 9A (``cryptography``).

==============  ==============================================================
SELECT   A4     PIV AID (A0 00 00 03 08 00 00 10 00 01 00, or its first 9
                bytes) → application property template 61 {4F PIX, 79 {4F
                RID}, 50 label, AC {80 11, 06 00}}; other → 6A82
GET DATA CB     3F FF, data 5C {tag}: 5FC102 CHUID, 5FC107 CCC, 7E discovery
                object, 5FC105 the 9A certificate (53 {70 DER, 71 00, FE}),
                over 256 bytes; other → 6A82
VERIFY   20     P2=80, PIN "123456" padded with FF to 8 bytes; wrong → 63Cx,
                blocked → 6983; no data → 9000 if verified else 63Cx; P1=FF →
                forget the verification
GEN AUTH 87     P1=11 (ECC P-256), P2=9A, data 7C {82 00, 81 hash}: needs the
                PIN; answers 7C {82 DER ECDSA signature}
GET CHAL 84     Le random bytes (so OpenSC's RNG probe gets an answer)
==============  ==============================================================

Answers longer than Le come as 61xx + GET RESPONSE, as T=1 PIV cards (YubiKey,
Gemalto) deliver them to OpenSC's short APDUs (docs/middleware-facts.md#M6).

Run: ``python -m lab.cards.piv --port P --key-dir DIR``; in-process:
``VpcdClient(port, PivCard.from_key_dir(DIR)).start()``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding

from ccidbridge.protocol.atr import tck
from lab.cards.apdu import (
    SW_INS_NOT_SUPPORTED,
    SW_NOT_FOUND,
    SW_SECURITY,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Apdu,
    Applet,
    Pin,
    Reply,
    find_tlv,
    status,
    tlv,
)
from lab.cards.keys import ensure_keys
from lab.cards.vpcd import CardSpec, card_main

PIV_AID = bytes.fromhex("A000000308000010000100")
PIN = b"123456"
ALG_ECC_P256 = 0x11
KEY_9A = 0x9A
#: Historical bytes: plain text after a proprietary category byte, so no
#: OpenSC driver recognises the card by its ATR and PIV-II finds it by AID.
HIST = b"ccidPIV1"
_BODY = bytes([0xF0 | len(HIST)]) + bytes.fromhex("1300008131FE15") + HIST
ATR = b"\x3b" + _BODY + bytes([tck(_BODY)])

FASCN = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")
GUID = bytes.fromhex("63636964627269646765000000000001")  # "ccidbridge" + serial


def chuid() -> bytes:
    """Card holder unique identifier (SP 800-73-4 part 1, §3.1.2)."""
    return tlv(0x53, tlv(0x30, FASCN) + tlv(0x34, GUID) + tlv(0x35, b"20441231")
               + tlv(0x3E, b"") + tlv(0xFE, b""))  # fmt: skip


def ccc() -> bytes:
    """Card capability container (SP 800-73-4 part 1, §3.1.1)."""
    card_id = bytes.fromhex("A000000116FF") + bytes(15)
    return tlv(0x53, tlv(0xF0, card_id) + tlv(0xF1, b"\x21") + tlv(0xF2, b"\x21")
               + tlv(0xF3, b"") + tlv(0xF4, b"\x00") + tlv(0xF5, b"\x10") + tlv(0xF6, b"")
               + tlv(0xF7, b"") + tlv(0xFA, b"") + tlv(0xFB, b"") + tlv(0xFC, b"")
               + tlv(0xFD, b"") + tlv(0xFE, b""))  # fmt: skip


def discovery() -> bytes:
    """Discovery object 7E: the AID and the PIN usage policy (PIV PIN only)."""
    return tlv(0x7E, tlv(0x4F, PIV_AID) + tlv(0x5F2F, b"\x40\x00"))


def cert_object(der: bytes) -> bytes:
    """A certificate container: 70 certificate, 71 CertInfo 00 (not compressed), FE LRC."""
    return tlv(0x53, tlv(0x70, der) + tlv(0x71, b"\x00") + tlv(0xFE, b""))


def apt() -> bytes:
    """The application property template SELECT answers (SP 800-73-4 part 2, §3.1.1)."""
    return tlv(0x61, tlv(0x4F, PIV_AID[5:]) + tlv(0x79, tlv(0x4F, PIV_AID[:5]))
               + tlv(0x50, b"ccidbridge PIV") + tlv(0xAC, tlv(0x80, bytes([ALG_ECC_P256]))
                                                 + tlv(0x06, b"\x00")))  # fmt: skip


@dataclass
class PivCard(Applet):
    """The card's logic (sans-IO)."""

    key: ec.EllipticCurvePrivateKey | None = None
    cert: x509.Certificate | None = None
    pin: Pin = field(default_factory=lambda: Pin(PIN))
    selected: bool = False
    verified: bool = False

    def __post_init__(self) -> None:
        if self.key is None or self.cert is None:
            raise ValueError("PIV card needs the 9A key and its certificate")
        self.atr = ATR

    @classmethod
    def from_key_dir(cls, key_dir: Path | str) -> PivCard:
        k = ensure_keys(key_dir)
        return cls(key=k.piv_9a, cert=k.piv_9a_cert)

    def reset(self) -> None:
        self.selected = False
        self.verified = False

    def objects(self) -> dict[bytes, bytes]:
        assert self.cert is not None
        return {
            bytes.fromhex("5FC102"): chuid(),
            bytes.fromhex("5FC107"): ccc(),
            bytes.fromhex("7E"): discovery(),
            bytes.fromhex("5FC105"): cert_object(self.cert.public_bytes(Encoding.DER)),
        }

    def handle(self, a: Apdu) -> Reply:
        if a.cla & 0xEF:
            return status(0x6E00)
        if a.ins == 0xA4:
            return self._select(a)
        if a.ins == 0x84:  # GET CHALLENGE works without the applet, as on real cards
            return Reply(os.urandom(min(a.le, 256))) if a.le else status(SW_WRONG_LENGTH)
        if not self.selected:
            return status(SW_NOT_FOUND if a.ins == 0xCB else SW_INS_NOT_SUPPORTED)
        handler = {0xCB: self._get_data, 0x20: self._verify, 0x87: self._general_auth}.get(a.ins)
        return handler(a) if handler else status(SW_INS_NOT_SUPPORTED)

    def _select(self, a: Apdu) -> Reply:
        if a.p1 == 0x04 and len(a.data) >= 9 and PIV_AID.startswith(a.data):
            self.selected = True
            self.verified = False
            return Reply(apt())
        if a.p1 == 0x04:
            self.selected = False
        return status(SW_NOT_FOUND)

    def _get_data(self, a: Apdu) -> Reply:
        if (a.p1, a.p2) != (0x3F, 0xFF):
            return status(SW_WRONG_P1P2)
        try:
            tag = find_tlv(a.data, 0x5C)
        except ValueError:
            tag = None
        if tag is None:
            return status(SW_WRONG_DATA)
        value = self.objects().get(tag)
        return Reply(value) if value is not None else status(SW_NOT_FOUND)

    def _verify(self, a: Apdu) -> Reply:
        if a.p2 != 0x80 or a.p1 not in (0x00, 0xFF):
            return status(SW_WRONG_P1P2)
        if a.p1 == 0xFF:
            self.verified = False
            return status(0x9000)
        if not a.data:
            if self.verified:
                return status(0x9000)
            return status(0x63C0 | self.pin.tries if self.pin.tries else 0x6983)
        if len(a.data) != 8:
            return status(SW_WRONG_DATA)
        sw = self.pin.check(a.data.rstrip(b"\xff"))
        self.verified = sw == 0x9000
        return status(sw)

    def _general_auth(self, a: Apdu) -> Reply:
        if (a.p1, a.p2) != (ALG_ECC_P256, KEY_9A):
            return status(SW_WRONG_P1P2 if a.p2 != KEY_9A else SW_WRONG_DATA)
        if not self.verified:
            return status(SW_SECURITY)
        try:
            template = find_tlv(a.data, 0x7C)
            challenge = find_tlv(template, 0x81) if template is not None else None
        except ValueError:
            challenge = None
        if challenge is None:
            return status(SW_WRONG_DATA)
        # The host hashed and sends the digest; fit it to the curve's 32 bytes as
        # OpenSC's piv driver and real cards do (left-pad or truncate).
        digest = challenge[:32].rjust(32, b"\x00")
        assert self.key is not None
        sig = self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return Reply(tlv(0x7C, tlv(0x82, sig)))


def spec(key_dir: Path | str) -> CardSpec:
    """How to run this card in-process or as a process (lab/cards/slot.py)."""
    return CardSpec("lab.cards.piv", ["--key-dir", str(key_dir)],
                    lambda: PivCard.from_key_dir(key_dir))  # fmt: skip


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-dir", required=True, help="key directory (lab/cards/keys.py)")


def main(argv: list[str] | None = None) -> int:
    return card_main("lab.cards.piv", __doc__, lambda a: PivCard.from_key_dir(a.key_dir), argv,
                     _arguments)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
