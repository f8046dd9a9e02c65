"""An OpenPGP card 3.4, YubiKey-5-style, with real RSA-2048 keys (``cryptography``).

What it answers (OpenPGP card spec 3.4; what GnuPG's scdaemon and OpenSC's
``openpgp`` driver read: docs/middleware-facts.md#M1 .. #M8):

==============  ==============================================================
SELECT   A4     AID D2 76 00 01 24 01 → 9000 (no FCI, like a YubiKey); other → 6A82
GET DATA CA     004F AID (version 3.4, manufacturer 0006, serial 12345678),
                005E login, 5F50 URL, 5F52 historical bytes, 0065 cardholder
                data, 006E application related data (4F, 5F52, 7F74, 7F66,
                73 {C0 C1 C2 C3 C4 C5 C6 CD DE}), 007A (93 signature
                counter), C0..C6, CD, DE, 7F66, 7F74, 7F21 (a DER
                certificate > 256 bytes); other → 6A88
VERIFY   20     P2 81/82 = PW1 "123456", 83 = PW3 "12345678"; wrong → 63Cx,
                blocked → 6983; no data → 9000 if verified else 63Cx;
                P1=FF → forget the verification
PSO      2A     9E9A COMPUTE DIGITAL SIGNATURE (needs PW1/81; the data is a
                PKCS#1 DigestInfo), 8086 DECIPHER (needs PW1/82; 00 ‖ RSA
                PKCS#1 v1.5 cryptogram)
INT AUTH 88     DigestInfo signed with the authentication key (needs PW1/82)
GEN KEY  47     P1=81: read the public key (7F49 {81 n, 82 e}, 270 bytes)
GET CHAL 84     Le random bytes
SEL DATA A5     P1=0..2 with 5C 02 7F 21: which 7F21 GET DATA reads (OpenSC
                selects each before reading it); only 0 (AUT) holds one
==============  ==============================================================

Long answers (the public keys, 006E with extended length, 7F21) come whole
when Le allows, else in 61xx/GET RESPONSE pieces; long commands may come
extended or chained (lab/cards/apdu.py).

The extended-Lc/Le capability is announced in three places, each of which can
be switched off (``ext_atr``, ``ext_hist``, ``ext_info``; on the command line
``--no-ext-atr``, ``--no-ext-hist``, ``--no-ext-info``): the ATR's historical
bytes (card capabilities, compact TLV 73, third byte bit 0x40), DO 5F52 (the
historical bytes read by GET DATA, same bit) and DO 7F66 (extended length
information, also inside 006E; switched off = absent).

Run: ``python -m lab.cards.openpgp --port P --key-dir DIR [--no-ext-…]``;
in-process: ``VpcdClient(port, OpenPgpCard.from_key_dir(DIR)).start()``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding

from ccidbridge.protocol.atr import tck
from lab.cards.apdu import (
    SW_BLOCKED,
    SW_CONDITIONS,
    SW_FUNC_NOT_SUPPORTED,
    SW_INS_NOT_SUPPORTED,
    SW_NOT_FOUND,
    SW_REF_NOT_FOUND,
    SW_SECURITY,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Apdu,
    Applet,
    Pin,
    Reply,
    status,
    tlv,
)
from lab.cards.keys import ensure_keys
from lab.cards.vpcd import CardSpec, card_main

AID_PREFIX = bytes.fromhex("D27600012401")
VERSION = (3, 4)
MANUFACTURER = 0x0006  # Yubico
SERIAL = 0x12345678
#: The application identifier (DO 4F): RID+PIX, version, manufacturer, serial, RFU.
AID = (
    AID_PREFIX + bytes(VERSION) + MANUFACTURER.to_bytes(2, "big") + SERIAL.to_bytes(4, "big")
    + b"\x00\x00"
)  # fmt: skip
PW1 = b"123456"
PW3 = b"12345678"
#: Key creation time (DO CD) and OpenPGP v4 fingerprint timestamp: fixed, so the
#: fingerprints only depend on the keys (2024-01-01T00:00:00Z).
KEY_CREATED = 1704067200
SLOTS = ("sig", "dec", "aut")
#: Control reference templates in GENERATE ASYMMETRIC KEY PAIR data.
CRT = {0xB6: "sig", 0xB8: "dec", 0xA4: "aut"}

CAP_CHAINING = 0x80
CAP_EXT_LC_LE = 0x40
CAP_EXT_INFO = 0x20  # extended length information in EF.ATR/INFO


def atr(ext: bool = True) -> bytes:
    """A YubiKey 5's ATR (T=1 only); ``ext=False`` clears the extended-Lc/Le bit.

    3B FD 13 00 00 81 31 FE 15 | 80 73 C0 21 C0 57 "YubiKey" | TCK: TD1=81 →
    T=1 only; historical bytes: category 80, card capabilities (73) C0 21 C0
    (third byte: 0x80 command chaining, 0x40 extended Lc/Le), issuer data (57).
    """
    third = CAP_CHAINING | (CAP_EXT_LC_LE if ext else 0)
    body = bytes.fromhex("FD1300008131FE15" "8073C021") + bytes([third]) + b"\x57YubiKey"
    return b"\x3b" + body + bytes([tck(body)])


def historical_do(ext: bool = True) -> bytes:
    """DO 5F52 as a YubiKey 5 has it: 00 | 73 00 00 E0 | 05 90 00 (status, SW)."""
    third = CAP_CHAINING | ((CAP_EXT_LC_LE | CAP_EXT_INFO) if ext else 0)
    return bytes([0x00, 0x73, 0x00, 0x00, third, 0x05, 0x90, 0x00])


#: Extended length information (DO 7F66): max command and response length.
MAX_EXT_LEN = 0x0BFE
EXT_INFO = tlv(0x02, MAX_EXT_LEN.to_bytes(2, "big")) * 2
#: Extended capabilities (C0): GET CHALLENGE only; SM none; max challenge 0BFE,
#: max cardholder certificate 0800, max special DO 00FF; no PIN block 2, no MSE.
EXT_CAPS = bytes.fromhex("40000BFE080000FF0000")
#: Algorithm attributes (C1..C3): RSA, 2048-bit modulus, 17-bit e, format 00.
ALGO_RSA2048 = bytes.fromhex("010800001100")


def _mpi(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return n.bit_length().to_bytes(2, "big") + raw


def v4_fingerprint(pub: rsa.RSAPublicKey, created: int = KEY_CREATED) -> bytes:
    """RFC 4880 §12.2: SHA-1 over 99 ‖ len ‖ v4 public-key packet body (algo 1 = RSA)."""
    nums = pub.public_numbers()
    body = b"\x04" + created.to_bytes(4, "big") + b"\x01" + _mpi(nums.n) + _mpi(nums.e)
    h = hashes.Hash(hashes.SHA1())
    h.update(b"\x99" + len(body).to_bytes(2, "big") + body)
    return h.finalize()


#: DigestInfo prefixes (RFC 8017 §9.2 note 1) → hash, for PKCS#1 v1.5 signing.
DIGEST_INFO: dict[bytes, hashes.HashAlgorithm] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): hashes.SHA1(),
    bytes.fromhex("302d300d06096086480165030402040500041c"): hashes.SHA224(),
    bytes.fromhex("3031300d060960864801650304020105000420"): hashes.SHA256(),
    bytes.fromhex("3041300d060960864801650304020205000430"): hashes.SHA384(),
    bytes.fromhex("3051300d060960864801650304020305000440"): hashes.SHA512(),
}


def sign_digest_info(key: rsa.RSAPrivateKey, digest_info: bytes) -> bytes | None:
    """PKCS#1 v1.5 signature of a DigestInfo, or None for an unknown hash."""
    for prefix, alg in DIGEST_INFO.items():
        if digest_info.startswith(prefix) and len(digest_info) == len(prefix) + alg.digest_size:
            digest = digest_info[len(prefix) :]
            return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(alg))
    return None


@dataclass
class OpenPgpCard(Applet):
    """The card's logic (sans-IO).  ``keys``: slot name → RSA private key."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    cardholder_cert: bytes = b""
    ext_atr: bool = True
    ext_hist: bool = True
    ext_info: bool = True
    pw1: Pin = field(default_factory=lambda: Pin(PW1))
    pw3: Pin = field(default_factory=lambda: Pin(PW3))
    #: PW1 status byte (C4, first byte): 01 = one VERIFY 81 allows several signatures
    pw1_multi: bool = True
    selected: bool = False
    verified: set[int] = field(default_factory=set)
    signatures: int = 0
    cert_occurrence: int = 0

    def __post_init__(self) -> None:
        missing = [s for s in SLOTS if s not in self.keys]
        if missing:
            raise ValueError(f"OpenPGP card needs keys for {', '.join(missing)}")
        self.atr = atr(self.ext_atr)

    @classmethod
    def from_key_dir(cls, key_dir: Path | str, **kwargs: bool) -> OpenPgpCard:
        k = ensure_keys(key_dir)
        return cls(keys=k.openpgp, cardholder_cert=k.openpgp_aut_cert.public_bytes(Encoding.DER),
                   **kwargs)  # fmt: skip

    def reset(self) -> None:
        self.selected = False
        self.verified = set()
        self.cert_occurrence = 0

    # -- data objects ----------------------------------------------------
    def fingerprint(self, slot: str) -> bytes:
        return v4_fingerprint(self.keys[slot].public_key())

    def public_key_do(self, slot: str) -> bytes:
        nums = self.keys[slot].public_key().public_numbers()
        n = nums.n.to_bytes(256, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        return tlv(0x7F49, tlv(0x81, n) + tlv(0x82, e))

    def pw_status(self) -> bytes:
        return bytes([0x01 if self.pw1_multi else 0x00, 127, 127, 127,
                      self.pw1.tries, 0, self.pw3.tries])  # fmt: skip

    def discretionary(self) -> bytes:
        fprs = b"".join(self.fingerprint(s) for s in SLOTS)
        times = KEY_CREATED.to_bytes(4, "big") * 3
        return tlv(
            0x73,
            tlv(0xC0, EXT_CAPS)
            + tlv(0xC1, ALGO_RSA2048) + tlv(0xC2, ALGO_RSA2048) + tlv(0xC3, ALGO_RSA2048)
            + tlv(0xC4, self.pw_status())
            + tlv(0xC5, fprs) + tlv(0xC6, bytes(60)) + tlv(0xCD, times)
            + tlv(0xDE, bytes.fromhex("010202020302")),  # keys 1..3: imported
        )  # fmt: skip

    def application_related(self) -> bytes:
        inner = tlv(0x4F, AID) + tlv(0x5F52, historical_do(self.ext_hist))
        inner += tlv(0x7F74, tlv(0x81, b"\x20"))
        if self.ext_info:
            inner += tlv(0x7F66, EXT_INFO)
        return tlv(0x6E, inner + self.discretionary())

    def data_object(self, tag: int) -> bytes | None:
        """GET DATA's answer for ``tag``: constructed DOs come with their own tag, as
        YubiKeys send them (docs/middleware-facts.md#M3)."""
        simple = {
            0x004F: AID,
            0x005E: b"ccidbridge",
            0x5F50: b"",
            0x5F52: historical_do(self.ext_hist),
            0x00C0: EXT_CAPS,
            0x00C1: ALGO_RSA2048,
            0x00C2: ALGO_RSA2048,
            0x00C3: ALGO_RSA2048,
            0x00C4: self.pw_status(),
            0x00C5: b"".join(self.fingerprint(s) for s in SLOTS),
            0x00C6: bytes(60),
            0x00CD: KEY_CREATED.to_bytes(4, "big") * 3,
            0x00DE: bytes.fromhex("010202020302"),
            0x7F74: tlv(0x81, b"\x20"),
            0x7F21: self.cardholder_cert if self.cert_occurrence == 0 else b"",
        }
        if tag in simple:
            return simple[tag]
        if tag == 0x7F66:
            return EXT_INFO if self.ext_info else None
        if tag == 0x0065:
            return tlv(0x65, tlv(0x5B, b"Card<<Test") + tlv(0x5F2D, b"en") + tlv(0x5F35, b"9"))
        if tag == 0x006E:
            return self.application_related()
        if tag == 0x007A:
            return tlv(0x7A, tlv(0x93, self.signatures.to_bytes(3, "big")))
        return None

    # -- commands ----------------------------------------------------------
    def handle(self, a: Apdu) -> Reply:
        if a.cla & ~0x10 & 0xFC:
            return status(0x6E00)
        if a.ins == 0xA4:
            return self._select(a)
        if not self.selected:
            return status(SW_CONDITIONS if a.ins != 0xCA else SW_REF_NOT_FOUND)
        handler = {
            0xCA: self._get_data,
            0x20: self._verify,
            0x2A: self._pso,
            0x88: self._internal_auth,
            0x47: self._generate,
            0x84: self._challenge,
            0xA5: self._select_data,
        }.get(a.ins)
        return handler(a) if handler else status(SW_INS_NOT_SUPPORTED)

    def _select(self, a: Apdu) -> Reply:
        if a.p1 == 0x04 and len(a.data) >= 5 and AID.startswith(a.data):
            self.selected = True
            self.verified = set()
            self.cert_occurrence = 0
            return status(0x9000)
        if a.p1 == 0x04:
            self.selected = False
        return status(SW_NOT_FOUND)

    def _get_data(self, a: Apdu) -> Reply:
        value = self.data_object((a.p1 << 8) | a.p2)
        if value is None:
            return status(SW_REF_NOT_FOUND)
        return Reply(value)

    def _select_data(self, a: Apdu) -> Reply:
        """SELECT DATA (3.x): which of the 3 cardholder certificates 7F21 means
        (0 = authentication key, the only one with a certificate here)."""
        if a.p2 != 0x04 or not a.data.endswith(b"\x5c\x02\x7f\x21"):
            return status(SW_WRONG_DATA)
        if a.p1 > 2:
            return status(SW_REF_NOT_FOUND)
        self.cert_occurrence = a.p1
        return status(0x9000)

    def _verify(self, a: Apdu) -> Reply:
        if a.p2 not in (0x81, 0x82, 0x83) or a.p1 not in (0x00, 0xFF):
            return status(SW_WRONG_P1P2)
        pin = self.pw3 if a.p2 == 0x83 else self.pw1
        if a.p1 == 0xFF:
            self.verified.discard(a.p2)
            return status(0x9000)
        if not a.data:
            if a.p2 in self.verified:
                return status(0x9000)
            return status(0x63C0 | pin.tries if pin.tries else SW_BLOCKED)
        sw = pin.check(a.data)
        if sw == 0x9000:
            self.verified.add(a.p2)
        else:
            self.verified.discard(a.p2)
        return status(sw)

    def _pso(self, a: Apdu) -> Reply:
        if (a.p1, a.p2) == (0x9E, 0x9A):
            if 0x81 not in self.verified:
                return status(SW_SECURITY)
            sig = sign_digest_info(self.keys["sig"], a.data)
            if sig is None:
                return status(SW_WRONG_DATA)
            if not self.pw1_multi:
                self.verified.discard(0x81)
            self.signatures += 1
            return Reply(sig)
        if (a.p1, a.p2) == (0x80, 0x86):
            if 0x82 not in self.verified:
                return status(SW_SECURITY)
            if not a.data or a.data[0] != 0x00:
                return status(SW_WRONG_DATA)
            try:
                plain = self.keys["dec"].decrypt(a.data[1:], padding.PKCS1v15())
            except ValueError:
                return status(SW_WRONG_DATA)
            return Reply(plain)
        return status(SW_WRONG_P1P2)

    def _internal_auth(self, a: Apdu) -> Reply:
        if 0x82 not in self.verified:
            return status(SW_SECURITY)
        sig = sign_digest_info(self.keys["aut"], a.data)
        return Reply(sig) if sig is not None else status(SW_WRONG_DATA)

    def _generate(self, a: Apdu) -> Reply:
        if a.p1 != 0x81:
            return status(SW_FUNC_NOT_SUPPORTED)  # no on-card generation here
        if len(a.data) < 1 or a.data[0] not in CRT:
            return status(SW_WRONG_DATA)
        return Reply(self.public_key_do(CRT[a.data[0]]))

    def _challenge(self, a: Apdu) -> Reply:
        if a.le is None:
            return status(SW_WRONG_LENGTH)
        return Reply(os.urandom(min(a.le, MAX_EXT_LEN)))


def spec(key_dir: Path | str, *, ext_atr: bool = True, ext_hist: bool = True,
         ext_info: bool = True) -> CardSpec:  # fmt: skip
    """How to run this card in-process or as a process (lab/cards/slot.py)."""
    args = ["--key-dir", str(key_dir)]
    args += ["--no-ext-atr"] * (not ext_atr) + ["--no-ext-hist"] * (not ext_hist)
    args += ["--no-ext-info"] * (not ext_info)
    return CardSpec(
        "lab.cards.openpgp", args,
        lambda: OpenPgpCard.from_key_dir(key_dir, ext_atr=ext_atr, ext_hist=ext_hist,
                                         ext_info=ext_info),
    )  # fmt: skip


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-dir", required=True, help="key directory (lab/cards/keys.py)")
    p.add_argument("--no-ext-atr", action="store_true", help="no extended Lc/Le in the ATR")
    p.add_argument("--no-ext-hist", action="store_true", help="no extended Lc/Le in DO 5F52")
    p.add_argument("--no-ext-info", action="store_true", help="no DO 7F66")


def main(argv: list[str] | None = None) -> int:
    return card_main(
        "lab.cards.openpgp", __doc__,
        lambda a: OpenPgpCard.from_key_dir(a.key_dir, ext_atr=not a.no_ext_atr,
                                           ext_hist=not a.no_ext_hist,
                                           ext_info=not a.no_ext_info),
        argv, _arguments,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
