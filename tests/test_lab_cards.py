"""The project's own test cards (lab/cards) against real middleware on the host:
GnuPG (gpg, gpg-agent, scdaemon over pcscd) and OpenSC (openpgp-tool,
pkcs15-tool, pkcs11-tool with opensc-pkcs11.so), all through the lab's pcscd
and vpcd.  Signatures made by the cards are verified with their public keys
(gpg in a home that never saw the card; ``cryptography`` for PIV).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from lab.cards import openpgp, piv, strict_t1
from lab.cards.gnupg import GnupgHome, verify_detached
from lab.cards.keys import ensure_keys
from lab.cards.slot import CardInSlot
from lab.pcsc import HostConnection
from tests.fixtures_stack import missing

pytestmark = pytest.mark.stack

PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
PW1 = openpgp.PW1.decode()
PIV_PIN = piv.PIN.decode()


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("gpg", "gpg-agent", "gpg-connect-agent", "openpgp-tool", "pkcs15-tool",
                 "pkcs11-tool", "opensc-tool"):  # fmt: skip
        if shutil.which(tool) is None:
            missing(f"{tool} not installed")
    if not Path(PKCS11).exists() or not Path("/usr/lib/gnupg/scdaemon").exists():
        missing("opensc-pkcs11 or scdaemon not installed")


def shown(args: tuple[str, ...]) -> str:
    """The command line for a message, the PIN masked (PINs never reach test output)."""
    out = list(args)
    for i in range(1, len(out)):
        if out[i - 1] == "--pin":
            out[i] = "***"
    return " ".join(out)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise AssertionError(f"{shown(args)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def spaced(fpr: bytes) -> str:
    """A fingerprint as ``gpg --card-status`` prints it: 5 groups, 2 spaces, 5 groups."""
    groups = [fpr.hex().upper()[i : i + 4] for i in range(0, 40, 4)]
    return " ".join(groups[:5]) + "  " + " ".join(groups[5:])


def card_logic(key_dir: Path, **options: bool) -> openpgp.OpenPgpCard:
    """The same card logic as the inserted one, for expected values."""
    return openpgp.OpenPgpCard.from_key_dir(key_dir, **options)


# -- OpenPGP card with GnuPG ---------------------------------------------------------


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_gpg_card_status_shows_the_card(
    own_card: Callable[..., CardInSlot], card_keys: Path, process: bool
) -> None:
    card = own_card(openpgp.spec(card_keys), process=process)
    assert card.inserted_state is not None and card.inserted_state.atr == openpgp.atr()
    expect = card_logic(card_keys)
    with GnupgHome() as g:
        r = g.gpg("--card-status")
    assert r.returncode == 0, r.stderr
    assert "Application ID ...: D2760001240103040006123456780000" in r.stdout
    assert re.search(r"^Version \.+: 3\.4$", r.stdout, re.M)
    assert "Manufacturer .....: Yubico" in r.stdout
    assert "Key attributes ...: rsa2048 rsa2048 rsa2048" in r.stdout
    assert "PIN retry counter : 3 0 3" in r.stdout
    for label, slot in (("Signature key ....", "sig"), ("Encryption key....", "dec"),
                        ("Authentication key", "aut")):  # fmt: skip
        assert f"{label}: {spaced(expect.fingerprint(slot))}" in r.stdout


def test_gpg_signature_made_by_the_card_verifies(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path
) -> None:
    """gpg builds its key from the card's signing key (Key-Grip, the card's creation
    time): its fingerprint is the card's C5, and a detached signature made with the
    card verifies in a home that only has the exported public key."""
    own_card(openpgp.spec(card_keys))
    expect = card_logic(card_keys).fingerprint("sig").hex().upper()
    data = tmp_path / "data.txt"
    data.write_bytes(b"signed by the ccidbridge OpenPGP test card\n")
    sig = tmp_path / "data.sig"
    with GnupgHome() as g:
        grips = g.learn_card()
        g.set_pin(PW1)
        assert g.key_from_card(grips["OPENPGP.1"], openpgp.KEY_CREATED) == expect
        r = g.gpg("--detach-sign", "-o", str(sig), str(data))
        assert r.returncode == 0, r.stderr
        pub = g.gpg("--armor", "--export", check=True).stdout.encode()
        status = g.gpg("--card-status").stdout
    assert re.search(r"Signature counter : [1-9]", status)
    assert verify_detached(pub, sig, data) == expect
    data.write_bytes(b"tampered\n")
    assert verify_detached(pub, sig, data) is None


def test_gpg_wrong_pin_counts_down(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path
) -> None:
    """VERIFY with a wrong PW1 through scdaemon: the card's counter drops (63Cx)."""
    own_card(openpgp.spec(card_keys))
    with GnupgHome() as g:
        learn = g.agent_cmd("SCD LEARN --force")
        assert "KEYPAIRINFO" in learn.stdout, learn.stdout
        g.set_pin("654321")
        r = g.agent_cmd("SCD CHECKPIN D2760001240103040006123456780000")
        assert "ERR" in r.stdout
        status = g.gpg("--card-status").stdout
    assert "PIN retry counter : 2 0 3" in status


@pytest.mark.parametrize(
    ("options", "scdaemon_ext"),
    [
        ({}, "yes"),
        ({"ext_hist": False}, "no"),
        ({"ext_atr": False, "ext_info": False}, "yes"),
        ({"ext_atr": False, "ext_hist": False, "ext_info": False}, "no"),
    ],
    ids=["all", "no-5F52", "only-5F52", "none"],
)
def test_scdaemon_reads_extended_length_from_5f52_only(
    own_card: Callable[..., CardInSlot], card_keys: Path, options: dict[str, bool],
    scdaemon_ext: str,
) -> None:  # fmt: skip
    """docs/middleware-facts.md#M2: scdaemon takes the capability from DO 5F52 alone."""
    own_card(openpgp.spec(card_keys, **options))
    with GnupgHome(scd_log=True) as g:
        r = g.gpg("--card-status")
        log = g.tail("scdaemon.log", 100_000)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"Ext-Lc-Le \.+: {scdaemon_ext}$", log, re.M), log


# -- OpenPGP card with OpenSC --------------------------------------------------------


def test_openpgp_tool_and_pkcs15_read_the_openpgp_card(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path
) -> None:
    own_card(openpgp.spec(card_keys))
    keys = ensure_keys(card_keys)
    r = run("openpgp-tool")
    assert "Account:         ccidbridge" in r.stdout
    assert "Language:        en" in r.stdout
    assert run("opensc-tool", "-n").stdout.strip() == "Yubikey 5 (OpenPGP v3.4) (0006 12345678)"
    dump = run("pkcs15-tool", "-D").stdout
    for label in ("Signature key", "Encryption key", "Authentication key", "AUT certificate"):
        assert label in dump
    assert "ModLength      : 2048" in dump
    # The cardholder certificate (7F21, > 256 bytes) comes back byte for byte.
    out = tmp_path / "aut.pem"
    run("pkcs15-tool", "--read-certificate", "03", "-o", str(out))
    der = keys.openpgp_aut_cert.public_bytes(Encoding.DER)
    assert len(der) > 256
    assert x509.load_pem_x509_certificate(out.read_bytes()).public_bytes(Encoding.DER) == der
    # The public keys (GENERATE ASYMMETRIC KEY PAIR P1=81, 270 bytes) too.
    pubout = tmp_path / "sig.pub"
    run("pkcs15-tool", "--read-public-key", "01", "-o", str(pubout))
    assert load_pem_public_key(pubout.read_bytes()) == keys.openpgp["sig"].public_key()


@pytest.mark.parametrize(
    ("options", "extended"),
    [
        ({}, True),
        ({"ext_atr": False}, True),
        ({"ext_hist": False}, True),
        ({"ext_atr": False, "ext_hist": False}, False),
    ],
    ids=["all", "no-atr", "no-5F52", "no-atr-no-5F52"],
)
def test_opensc_reads_extended_length_from_atr_or_5f52(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path,
    options: dict[str, bool], extended: bool,
) -> None:  # fmt: skip
    """docs/middleware-facts.md#M4: OpenSC's openpgp driver takes the capability from the
    ATR's historical bytes or DO 5F52 (7F66 only sizes it); without both, the 7F21
    certificate (> 256 bytes) comes with a short Le and 61xx/GET RESPONSE."""
    card = own_card(openpgp.spec(card_keys, **options), process=False)
    out = tmp_path / "aut.pem"
    run("pkcs15-tool", "--read-certificate", "03", "-o", str(out))
    der = ensure_keys(card_keys).openpgp_aut_cert.public_bytes(Encoding.DER)
    assert x509.load_pem_x509_certificate(out.read_bytes()).public_bytes(Encoding.DER) == der
    assert isinstance(card.logic, openpgp.OpenPgpCard)
    if extended:
        assert card.logic.extended_commands >= 1 and card.logic.answers_61xx == 0
    else:
        assert card.logic.extended_commands == 0 and card.logic.answers_61xx >= 1


@pytest.mark.parametrize("ext", [True, False], ids=["extended", "chained"])
def test_pkcs11_decrypt_with_the_openpgp_card(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path, ext: bool
) -> None:
    """PSO:DECIPHER carries 257 bytes: OpenSC sends it with extended Lc when the card
    announces extended length, else chained (CLA 10), which the card joins; either
    way the plaintext comes back."""
    card = own_card(
        openpgp.spec(card_keys, ext_atr=ext, ext_hist=ext, ext_info=ext), process=False
    )
    keys = ensure_keys(card_keys)
    secret = b"a session key, say"
    cipher = tmp_path / "cipher.bin"
    cipher.write_bytes(keys.openpgp["dec"].public_key().encrypt(secret, padding.PKCS1v15()))
    plain = tmp_path / "plain.bin"
    run("pkcs11-tool", "--module", PKCS11, "--token-label", "OpenPGP card (User PIN)",
        "--login", "--pin", PW1, "--decrypt", "--id", "02", "-m", "RSA-PKCS",
        "-i", str(cipher), "-o", str(plain))  # fmt: skip
    assert plain.read_bytes() == secret
    assert isinstance(card.logic, openpgp.OpenPgpCard)
    if ext:
        assert card.logic.extended_commands >= 1 and card.logic.chained_commands == 0
    else:
        assert card.logic.chained_commands == 1 and card.logic.extended_commands == 0


# -- PIV card with OpenSC / PKCS#11 --------------------------------------------------


def test_pkcs11_lists_the_piv_card(own_card: Callable[..., CardInSlot], card_keys: Path) -> None:
    own_card(piv.spec(card_keys))
    assert run("opensc-tool", "-n").stdout.strip() == "Personal Identity Verification Card"
    r = run("pkcs11-tool", "--module", PKCS11, "-L", "-O")
    assert "token manufacturer : piv_II" in r.stdout
    assert "Certificate for PIV Authentication" in r.stdout
    assert "Public Key Object; EC  EC_POINT 256 bits" in r.stdout
    assert "CN=PIV test card authentication" in r.stdout


def test_piv_certificate_over_256_bytes_reads_back(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path
) -> None:
    own_card(piv.spec(card_keys))
    der = ensure_keys(card_keys).piv_9a_cert.public_bytes(Encoding.DER)
    assert len(der) > 256
    out = tmp_path / "9a.pem"
    run("pkcs15-tool", "--read-certificate", "01", "-o", str(out))
    assert x509.load_pem_x509_certificate(out.read_bytes()).public_bytes(Encoding.DER) == der


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_pkcs11_signature_with_the_piv_card_verifies(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path, process: bool
) -> None:
    own_card(piv.spec(card_keys), process=process)
    data = tmp_path / "data.txt"
    data.write_bytes(b"signed by the ccidbridge PIV test card\n")
    sig = tmp_path / "data.sig"
    run("pkcs11-tool", "--module", PKCS11, "--login", "--pin", PIV_PIN, "--sign", "--id", "01",
        "-m", "ECDSA-SHA256", "-i", str(data), "-o", str(sig))  # fmt: skip
    raw = sig.read_bytes()
    assert len(raw) == 64  # r ‖ s, as PKCS#11 wants it
    r_s = (int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    der = utils.encode_dss_signature(*r_s)
    pub = ensure_keys(card_keys).piv_9a_cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(der, data.read_bytes(), ec.ECDSA(hashes.SHA256()))


def test_pkcs11_wrong_piv_pin_is_refused(
    own_card: Callable[..., CardInSlot], card_keys: Path, tmp_path: Path
) -> None:
    own_card(piv.spec(card_keys))
    data = tmp_path / "data.txt"
    data.write_bytes(b"x")
    r = run("pkcs11-tool", "--module", PKCS11, "--login", "--pin", "000000", "--sign",
            "--id", "01", "-m", "ECDSA-SHA256", "-i", str(data), "-o", str(tmp_path / "s"),
            check=False)  # fmt: skip
    assert r.returncode != 0
    assert "CKR_PIN_INCORRECT" in r.stdout + r.stderr


# -- strict T=1 card ---------------------------------------------------------------------


SELECT_T1 = "00A4040007" + strict_t1.AID.hex().upper()


def test_opensc_tool_on_the_strict_t1_card(own_card: Callable[..., CardInSlot]) -> None:
    own_card(strict_t1.spec())
    atr = run("opensc-tool", "-a").stdout.strip()
    assert atr == ":".join(f"{b:02x}" for b in strict_t1.ATR)
    r = run("opensc-tool", "-s", SELECT_T1, "-s", SELECT_T1 + "00")
    no_le, with_le = r.stdout.split("Sending: ")[1:]
    assert no_le.rstrip().endswith("Received (SW1=0x90, SW2=0x00)")  # bare 9000, no data
    assert "Received (SW1=0x90, SW2=0x00):" in with_le and "6F 1C 84 07" in with_le


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_strict_t1_case4_data_only_with_le(
    own_card: Callable[..., CardInSlot], process: bool
) -> None:
    card = own_card(strict_t1.spec(), process=process)
    with HostConnection(card.reader) as conn:
        assert conn.proto == 2  # T=1
        assert conn.ok(SELECT_T1) == b"\x90\x00"
        assert conn.ok(SELECT_T1 + "00") == strict_t1.fci() + b"\x90\x00"
        h = hashes.Hash(hashes.SHA256())
        h.update(b"\xde\xad\xbe\xef")
        assert conn.ok("0088000004DEADBEEF") == b"\x90\x00"
        assert conn.ok("0088000004DEADBEEF00") == h.finalize() + b"\x90\x00"
        assert conn.ok("00A40000020101") == b"\x90\x00"
        long = conn.ok("00B0000000")  # 256 bytes of a 1024-byte EF: never 61xx
        assert len(long) == 258 and long[-2:] == b"\x90\x00"
