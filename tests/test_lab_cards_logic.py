"""lab/cards' card logic without any transport: APDU/TLV parsing, the Le and
chaining rules of the shared applet base, and the OpenPGP, PIV and strict T=1
cards' answers, with their signatures checked by ``cryptography``."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.serialization import Encoding

from ccidbridge.protocol.atr import parse as parse_atr
from lab.cards import openpgp, piv, strict_t1
from lab.cards.apdu import Apdu, Applet, Reply, find_tlv, parse_tlv, tlv
from lab.cards.keys import ensure_keys

SELECT_PGP = "00A4040006D27600012401"
SELECT_PIV = "00A4040009A00000030800001000"


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    ensure_keys(d)
    return d


def tx(card: Applet, hexapdu: str) -> tuple[bytes, int]:
    r = card.process(bytes.fromhex(hexapdu))
    return r[:-2], int.from_bytes(r[-2:], "big")


# -- APDU and TLV ------------------------------------------------------------------


@pytest.mark.parametrize(
    "apdu",
    [
        Apdu(0, 0xA4, 4, 0, b"", None),
        Apdu(0, 0xCA, 0, 0x6E, b"", 256),
        Apdu(0, 0x20, 0, 0x81, b"123456", None),
        Apdu(0, 0x2A, 0x80, 0x86, bytes(257), 256, True),
        Apdu(0, 0xCA, 0x7F, 0x21, b"", 65534, True),
        Apdu(0, 0x88, 0, 0, b"\x01" * 300, None, True),
    ],
)
def test_apdu_encode_parse_round_trip(apdu: Apdu) -> None:
    assert Apdu.parse(apdu.encode()) == apdu


def test_tlv_round_trip_and_multibyte_tags() -> None:
    value = bytes(300)
    data = tlv(0x7F49, tlv(0x81, value) + tlv(0x82, b"\x01\x00\x01")) + tlv(0x5F52, b"\x00")
    top = parse_tlv(data)
    assert [t for t, _ in top] == [0x7F49, 0x5F52]
    assert find_tlv(top[0][1], 0x81) == value
    assert data[:4] == bytes.fromhex("7F498201")  # 82-form length for 0x10A bytes


@pytest.mark.parametrize("bad", ["7F", "5F5205AA", "8184", "C1850100"])
def test_malformed_tlv_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_tlv(bytes.fromhex(bad))


# -- the shared Le and chaining rules --------------------------------------------------


class Echo(Applet):
    """Answers INS 01 with P1P2 pattern bytes, INS 02 with its data."""

    def handle(self, a: Apdu) -> Reply:
        if a.ins == 0x01:
            return Reply(bytes(i & 0xFF for i in range((a.p1 << 8) | a.p2)))
        return Reply(a.data)


def test_long_answer_comes_as_61xx_and_get_response() -> None:
    card = Echo()
    data, sw = tx(card, "0001012C00")  # 300 bytes, Le 256
    assert (len(data), sw) == (256, 0x612C)
    rest, sw = tx(card, "00C000002C")
    assert (len(rest), sw) == (44, 0x9000)
    assert data + rest == bytes(i & 0xFF for i in range(300))
    assert tx(card, "00C0000000") == (b"", 0x6985)  # nothing pending any more


def test_get_response_with_a_short_le_continues() -> None:
    card = Echo()
    _, sw = tx(card, "0001020000")  # 512 bytes
    assert sw == 0x6100  # 256 bytes still waiting
    part, sw = tx(card, "00C0000010")
    assert (len(part), sw) == (16, 0x61F0)  # 240 left


def test_extended_le_gets_everything_at_once() -> None:
    data, sw = tx(Echo(), "000103E8000000")
    assert (len(data), sw) == (1000, 0x9000)


def test_no_le_lenient_answers_strict_does_not() -> None:
    assert tx(Echo(), "0002000003AABBCC") == (bytes.fromhex("AABBCC"), 0x9000)
    assert tx(Echo(strict_le=True), "0002000003AABBCC") == (b"", 0x9000)


def test_command_chaining_joins_the_blocks() -> None:
    card = Echo()
    assert tx(card, "1002000002AABB") == (b"", 0x9000)
    assert tx(card, "1002000001CC") == (b"", 0x9000)
    assert tx(card, "0002000001DD00") == (bytes.fromhex("AABBCCDD"), 0x9000)
    assert card.chained_commands == 1


def test_chain_with_a_different_header_is_refused() -> None:
    card = Echo()
    tx(card, "1002000002AABB")
    assert tx(card, "0002010001CC00") == (b"", 0x6883)
    assert tx(card, "0002000001CC00") == (bytes.fromhex("CC"), 0x9000)  # chain dropped


# -- OpenPGP card ------------------------------------------------------------------


def pgp(key_dir: Path, **options: bool) -> openpgp.OpenPgpCard:
    card = openpgp.OpenPgpCard.from_key_dir(key_dir, **options)
    card.power_on()
    assert tx(card, SELECT_PGP) == (b"", 0x9000)
    return card


def test_openpgp_atr_is_a_yubikey_5s_and_can_drop_extended_length() -> None:
    yk = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")
    assert openpgp.atr() == yk
    off = openpgp.atr(ext=False)
    assert parse_atr(off).protocols == frozenset({1})
    diff = [i for i in range(len(yk)) if yk[i] != off[i]]
    assert diff == [13, len(yk) - 1]  # the capability byte (C0 → 80) and TCK
    assert off[13] == 0x80
    assert parse_atr(off).tck_position == len(off) - 1  # TCK still valid (parse checks)


def test_openpgp_application_related_data(key_dir: Path) -> None:
    card = pgp(key_dir)
    data, sw = tx(card, "00CA006E00")
    assert sw == 0x9000
    (tag, body), = parse_tlv(data)
    assert tag == 0x6E
    assert find_tlv(body, 0x4F) == openpgp.AID
    assert find_tlv(body, 0x5F52) == bytes.fromhex("00730000E0059000")
    assert find_tlv(body, 0x7F66) == bytes.fromhex("02020BFE02020BFE")
    dd = find_tlv(body, 0x73)
    assert dd is not None
    fprs = find_tlv(dd, 0xC5)
    assert fprs == b"".join(card.fingerprint(s) for s in openpgp.SLOTS)
    assert find_tlv(dd, 0xC1) == find_tlv(dd, 0xC2) == bytes.fromhex("010800001100")
    assert find_tlv(dd, 0xC4) == bytes.fromhex("017F7F7F030003")
    assert tx(card, "00CA00C500") == (fprs, 0x9000)


def test_openpgp_extended_length_switches(key_dir: Path) -> None:
    card = pgp(key_dir, ext_hist=False, ext_info=False)
    assert tx(card, "00CA5F5200") == (bytes.fromhex("0073000080059000"), 0x9000)
    assert tx(card, "00CA7F6600") == (b"", 0x6A88)
    data, _ = tx(card, "00CA006E00")
    assert find_tlv(parse_tlv(data)[0][1], 0x7F66) is None
    assert card.atr == openpgp.atr()  # the ATR is a switch of its own


def test_openpgp_pw1_counts_down_and_blocks(key_dir: Path) -> None:
    card = pgp(key_dir)
    wrong = "00200081063635343332 31".replace(" ", "")
    assert tx(card, wrong)[1] == 0x63C2
    assert tx(card, "0020008100")[1] == 0x63C2  # status query, no data
    assert tx(card, wrong)[1] == 0x63C1
    assert tx(card, wrong)[1] == 0x63C0
    right = "0020008106" + openpgp.PW1.hex()
    assert tx(card, right)[1] == 0x6983
    data, _ = tx(card, "00CA00C400")
    assert data[4] == 0  # PW1 counter in C4


def test_openpgp_signature_needs_pw1_and_verifies(key_dir: Path) -> None:
    card = pgp(key_dir)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"data")
    d = digest.finalize()
    di = bytes.fromhex("3031300d060960864801650304020105000420") + d
    cds = "002A9E9A" + bytes([len(di)]).hex() + di.hex() + "00"
    assert tx(card, cds) == (b"", 0x6982)
    assert tx(card, "0020008106" + openpgp.PW1.hex())[1] == 0x9000
    sig, sw = tx(card, cds)
    assert sw == 0x9000 and len(sig) == 256
    card.keys["sig"].public_key().verify(sig, b"data", padding.PKCS1v15(), hashes.SHA256())
    assert tx(card, "002A9E9A0401020304" + "00") == (b"", 0x6A80)  # not a DigestInfo
    counter, _ = tx(card, "00CA007A00")
    assert counter == bytes.fromhex("7A05930300 0001".replace(" ", ""))


def test_openpgp_decipher_and_internal_authenticate(key_dir: Path) -> None:
    card = pgp(key_dir)
    assert tx(card, "0020008206" + openpgp.PW1.hex())[1] == 0x9000
    ct = card.keys["dec"].public_key().encrypt(b"secret", padding.PKCS1v15())
    body = b"\x00" + ct
    apdu = Apdu(0, 0x2A, 0x80, 0x86, body, 256, True).encode()
    assert card.process(apdu) == b"secret\x90\x00"
    di = bytes.fromhex("3021300906052b0e03021a05000414") + bytes(20)
    sig, sw = tx(card, "0088000023" + di.hex() + "00")
    assert sw == 0x9000
    aut = card.keys["aut"].public_key()
    assert aut.recover_data_from_signature(sig, padding.PKCS1v15(), None) == di


def test_openpgp_public_key_read_is_longer_than_256(key_dir: Path) -> None:
    card = pgp(key_dir)
    total = len(card.public_key_do("sig"))
    assert total > 256
    head, sw = tx(card, "0047810002B60000")
    assert (len(head), sw) == (256, 0x6100 | (total - 256))
    rest, sw = tx(card, f"00C00000{total - 256:02X}")
    assert sw == 0x9000
    (tag, body), = parse_tlv(head + rest)
    assert tag == 0x7F49
    nums = card.keys["sig"].public_key().public_numbers()
    assert find_tlv(body, 0x81) == nums.n.to_bytes(256, "big")
    assert find_tlv(body, 0x82) == nums.e.to_bytes(3, "big")


def test_openpgp_cardholder_certificate_and_select_data(key_dir: Path) -> None:
    card = pgp(key_dir)
    der = card.cardholder_cert
    assert len(der) > 256
    assert card.process(Apdu(0, 0xCA, 0x7F, 0x21, b"", 65534, True).encode()) == der + b"\x90\x00"
    assert tx(card, "00A5010406600 45C027F21".replace(" ", ""))[1] == 0x9000
    assert tx(card, "00CA7F2100") == (b"", 0x9000)  # the 2nd certificate is empty
    assert tx(card, "00A5030406600 45C027F21".replace(" ", ""))[1] == 0x6A88


def test_keys_are_reused(key_dir: Path) -> None:
    a, b = ensure_keys(key_dir), ensure_keys(key_dir)
    assert a.openpgp["sig"].private_numbers() == b.openpgp["sig"].private_numbers()
    assert a.piv_9a_cert.public_bytes(Encoding.DER) == b.piv_9a_cert.public_bytes(Encoding.DER)


# -- PIV card ----------------------------------------------------------------------


def piv_card(key_dir: Path) -> piv.PivCard:
    card = piv.PivCard.from_key_dir(key_dir)
    card.power_on()
    return card


def get_data(tag: str) -> str:
    t = bytes.fromhex(tag)
    return "00CB3FFF" + bytes([len(t) + 2, 0x5C, len(t)]).hex() + t.hex() + "00"


def test_piv_select_answers_the_apt(key_dir: Path) -> None:
    card = piv_card(key_dir)
    data, sw = tx(card, SELECT_PIV + "00")
    assert sw == 0x9000
    (tag, body), = parse_tlv(data)
    assert tag == 0x61 and find_tlv(body, 0x4F) == piv.PIV_AID[5:]
    assert tx(card, "00A4040006D2760001240100")[1] == 0x6A82


def test_piv_objects(key_dir: Path) -> None:
    card = piv_card(key_dir)
    tx(card, SELECT_PIV)
    assert tx(card, get_data("7E")) == (piv.discovery(), 0x9000)
    chuid, _ = tx(card, get_data("5FC102"))
    assert find_tlv(parse_tlv(chuid)[0][1], 0x34) == piv.GUID
    ccc, _ = tx(card, get_data("5FC107"))
    assert parse_tlv(ccc)[0][0] == 0x53
    head, sw = tx(card, get_data("5FC105")[:-2] + "08")  # OpenSC's length probe
    assert len(head) == 8 and sw >> 8 == 0x61
    assert tx(card, get_data("5FC10A")) == (b"", 0x6A82)


def test_piv_certificate_object_is_longer_than_256(key_dir: Path) -> None:
    card = piv_card(key_dir)
    tx(card, SELECT_PIV)
    whole, sw = tx(card, get_data("5FC105"))
    while sw >> 8 == 0x61:
        more, sw = tx(card, "00C00000" + f"{sw & 0xFF:02X}")
        whole += more
    assert sw == 0x9000 and len(whole) > 256
    (tag, body), = parse_tlv(whole)
    assert tag == 0x53
    assert find_tlv(body, 0x70) == card.cert.public_bytes(Encoding.DER)  # type: ignore[union-attr]
    assert find_tlv(body, 0x71) == b"\x00"


def test_piv_verify_and_general_authenticate(key_dir: Path) -> None:
    card = piv_card(key_dir)
    tx(card, SELECT_PIV)
    digest = bytes(range(32))
    ga = "0087119A" + "26" + "7C2482008120" + digest.hex() + "00"
    assert tx(card, ga) == (b"", 0x6982)
    assert tx(card, "0020008008313131313131FFFF")[1] == 0x63C2
    assert tx(card, "0020008008" + piv.PIN.hex() + "FFFF")[1] == 0x9000
    data, sw = tx(card, ga)
    assert sw == 0x9000
    sig = find_tlv(find_tlv(data, 0x7C) or b"", 0x82)
    assert sig is not None
    assert card.key is not None
    card.key.public_key().verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


# -- strict T=1 card ---------------------------------------------------------------


def test_strict_t1_answers_data_only_with_le() -> None:
    card = strict_t1.StrictT1Card()
    card.power_on()
    sel = "00A4040007" + strict_t1.AID.hex()
    assert tx(card, sel) == (b"", 0x9000)
    assert tx(card, sel + "00") == (strict_t1.fci(), 0x9000)
    assert tx(card, "00CA010100") == (strict_t1.DATA_0101, 0x9000)
    assert tx(card, "00CA0101") == (b"", 0x9000)
    assert tx(card, "0084000000")[1] == 0x9000 and tx(card, "00840000") == (b"", 0x6700)


def test_strict_t1_never_answers_61xx() -> None:
    card = strict_t1.StrictT1Card()
    card.power_on()
    tx(card, "00A40000020101")
    data, sw = tx(card, "00B0000010")
    assert (data, sw) == (bytes(range(16)), 0x9000)
    data, sw = tx(card, "0088000004DEADBEEF10")  # 32-byte hash, Le 16: cut, no 61xx
    assert (len(data), sw) == (16, 0x9000)
    assert card.process(Apdu(0, 0xB0, 0, 0, b"", 1024, True).encode())[-2:] == b"\x90\x00"
    assert card.answers_61xx == 0
