"""Real middleware in a real guest, through `ccidbridge run` with the default
config, against the same card directly on the host: the outputs must match.

Each test runs a list of middleware commands on the host first (the lab's
private pcscd, a private GNUPGHOME), restarts the card so the guest gets the
same fresh card, then boots the middleware guest (lab/guest/middleware.py)
through the bridge and runs the same commands there.  Outputs are compared
line by line after the documented differences are normalised: the reader's
name and the ATR the bridge announces for a T=1-only card
(docs/compatibility.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from ccidbridge.protocol.atr import announce_t0
from lab.bridgeproc import BridgeProcess, device_args, write_config
from lab.cards import openpgp, piv, strict_t1
from lab.cards.gnupg import GnupgHome, verify_detached
from lab.cards.keys import ensure_keys
from lab.cards.slot import CardInSlot
from lab.guest import GuestImage
from lab.guest.middleware import CommandResult, MiddlewareRun, run_commands, run_on_host

pytestmark = [pytest.mark.guest, pytest.mark.stack]

VICC_ATR = bytes.fromhex("3B9513810180 73FF01000B".replace(" ", ""))


class Middleware:
    """One card's host-direct and in-guest runs of the same commands."""

    def __init__(self, tmp: Path, reader: str, image: GuestImage, **reader_attrs: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.reader = reader
        self.image = image
        self.config = write_config(tmp / "vm.xml", tmp / "vsc.sock", reader, **reader_attrs)
        self.args = device_args(self.config)
        self.bridge: BridgeProcess | None = None

    def on_host(self, commands: list[str]) -> list[CommandResult]:
        """The commands on the host, GnuPG in a fresh home with its own agent."""
        with GnupgHome() as home:
            home.set_pin(openpgp.PW1.decode())  # what the guest's pinentry answers
            self.host_home = str(home.path)
            return run_on_host(commands, home.env)

    def in_guest(self, commands: list[str], timeout: float = 170.0) -> MiddlewareRun:
        self.bridge = BridgeProcess(self.config, self.tmp / "bridge.log", verbose=1)
        try:
            run = run_commands(self.image, self.args, commands, timeout).check()
        finally:
            self.bridge.stop()
        self.guest_seconds = run.run.wall_seconds
        return run

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.__exit__(None, None, None)


@pytest.fixture
def middleware(tmp_path: Path, middleware_image: GuestImage):
    made: list[Middleware] = []

    def make(reader: str, **attrs: str) -> Middleware:
        m = Middleware(tmp_path / f"m{len(made)}", reader, middleware_image, **attrs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def fresh(card: CardInSlot) -> None:
    """The same card, reset to its first state (PIN counters, signature counter)."""
    card.remove()
    card.insert()


def normalise(text: str, readers: tuple[str, ...], atrs: dict[bytes, str],
              homes: tuple[str, ...] = ()) -> str:
    """The output with the reader names, GnuPG homes and known ATR spellings replaced."""
    for reader in readers:
        text = text.replace(reader, "<reader>")
    for home in homes:
        text = text.replace(home, "<home>")
    for atr, name in atrs.items():
        for spelling in (atr.hex(":"), atr.hex(" ").upper(), atr.hex(" "), atr.hex(),
                         atr.hex().upper(), atr.hex(":").upper()):
            text = text.replace(spelling, name)
    # pkcs11-tool: slot numbers and ids depend on how many readers there are; the
    # host's empty vpcd slots are not in the guest at all.
    # pkcs11-tool cuts the slot description (the reader name) to 64 characters.
    text = re.sub(r"Slot \d+ \(0x[0-9a-f]+\): [^\n]*\n  \(empty\)\n", "", text)
    text = re.sub(r"Slot \d+ \(0x[0-9a-f]+\): [^\n]*", "Slot <n>: <reader>", text)
    text = re.sub(r"Using slot \d+ with a present token \(0x[0-9a-f]+\)", "Using slot <n>", text)
    # QEMU's usb-ccid claims PIN support (bPINSupport=1) it does not have: libccid
    # offers a PIN pad the guest's OpenSC then lists (docs/compatibility.md#C3).
    text = text.replace(", PIN pad present,", ",")
    # pkcs11-tool prints profile and data objects' handles, heap addresses.
    text = re.sub(r"(Profile|Data) object \d+", r"\1 object <handle>", text)
    # The serial console keeps no trailing blanks (lab/guest/boot.py parse_line).
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def masked(text: str) -> str:
    """``text`` without the PINs the commands carry (never in test output)."""
    return re.sub(r"--pin \S+", "--pin ***", text)


def assert_same(host: list[CommandResult], m: Middleware, run: MiddlewareRun,
                atrs: dict[bytes, str], only: range | None = None) -> None:
    """Every command: the same exit status and the same output, normalised."""
    assert run.run.reader, "the guest client printed no reader"
    readers = (run.run.reader, m.reader)
    homes = (getattr(m, "host_home", "/nonexistent"), "/root/.gnupg")
    assert len(run.results) >= len(host)  # the guest may run more (extra checks)
    pairs = list(zip(host, run.results[: len(host)], strict=True))
    for i, (h, g) in enumerate(pairs):
        if only is not None and i not in only:
            continue
        assert g.rc == h.rc, masked(f"{h.command}: rc host {h.rc}, guest {g.rc}\n{h.output}\n"
                                    f"{g.output}")
        assert normalise(g.output, readers, atrs, homes) == normalise(h.output, readers, atrs,
                                                                     homes), masked(h.command)


PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"


# -- vicc (iso7816) --------------------------------------------------------------------

VICC_COMMANDS = ["opensc-tool -a", "opensc-tool -n", f"pkcs11-tool --module {PKCS11} -L",
                 "opensc-tool -s 00A4000C023F00 -s 00B0000010"]


def test_opensc_on_vicc_iso7816_matches_the_host(vicc_card, middleware) -> None:
    m = middleware(vicc_card.reader)
    host = m.on_host(VICC_COMMANDS)
    assert host[0].rc == 0 and VICC_ATR.hex(":") in host[0].output
    vicc_card.stop()
    vicc_card.start()
    run = m.in_guest(VICC_COMMANDS)
    assert run.run.atr == announce_t0(VICC_ATR)
    assert announce_t0(VICC_ATR).hex(":") in run.results[0].output
    assert_same(host, m, run, {VICC_ATR: "<atr>", announce_t0(VICC_ATR): "<atr>"})


# -- the OpenPGP 3.4 card (YubiKey-style: T=1 only, extended Lc/Le) -------------------

SIGNED = "signed in the guest through ccidbridge"
GPG_SIGN = [
    # gpg's key for the card's signing key (Key-Grip; the card's creation time, so
    # its fingerprint is the card's), then a detached signature and the public key.
    "grip=$(gpg-connect-agent 'SCD LEARN --force' /bye"
    " | sed -n 's/.*KEYPAIRINFO \\([0-9A-F]\\{40\\}\\) OPENPGP\\.1.*/\\1/p'); "
    "printf 'Key-Type: RSA\\nKey-Grip: %s\\nKey-Usage: sign\\nName-Real: ccidbridge test"
    " card\\nExpire-Date: 0\\nCreation-Date: 20240101T000000\\n%%no-protection\\n"
    "%%commit\\n' \"$grip\" | gpg --batch --gen-key",
    f"d=$(mktemp -d); echo '{SIGNED}' > $d/data; gpg --batch --armor --detach-sign -o - $d/data",
    "gpg --armor --export",
]
#: OpenSC first: scdaemon keeps the reader once gpg has used the card.
OPENPGP_COMPARED = [
    "openpgp-tool",
    "pkcs15-tool -D",
    f"pkcs11-tool --module {PKCS11} -L -O",
    "pkcs15-tool --read-certificate 03",
    "gpg --card-status",
]
#: OpenSC names a YubiKey by its exact ATR, which the guest cannot see
#: (docs/compatibility.md#C1): compared by hand.
CARD_NAME = ["opensc-tool -n"]


def armored(text: str, kind: str) -> str:
    match = re.search(rf"-----BEGIN PGP {kind}-----.*?-----END PGP {kind}-----", text, re.S)
    assert match, text
    return match.group(0) + "\n"


def verify_gpg_signature(tmp: Path, results: list[CommandResult], fingerprint: str) -> None:
    """The detached signature verifies in a home that holds only the exported key,
    whose fingerprint is the card's own (computed from the card's key file)."""
    tmp.mkdir()
    (tmp / "data").write_text(SIGNED + "\n")
    (tmp / "data.asc").write_text(armored(results[-2].output, "SIGNATURE"))
    key = armored(results[-1].output, "PUBLIC KEY BLOCK").encode()
    assert verify_detached(key, tmp / "data.asc", tmp / "data") == fingerprint
    (tmp / "data").write_text("tampered\n")
    assert verify_detached(key, tmp / "data.asc", tmp / "data") is None


def test_openpgp_card_gnupg_and_opensc_in_the_guest_match_the_host(
    own_card, middleware, card_keys: Path, tmp_path: Path
) -> None:
    card = own_card(openpgp.spec(card_keys))
    m = middleware(card.reader)
    commands = CARD_NAME + OPENPGP_COMPARED + GPG_SIGN
    host = m.on_host(commands)
    status = host[len(OPENPGP_COMPARED)]
    assert status.rc == 0, status.output
    assert "Application ID ...: D2760001240103040006123456780000" in status.output
    fingerprint = openpgp.v4_fingerprint(ensure_keys(card_keys).openpgp["sig"].public_key())
    fresh(card)
    run = m.in_guest(commands)
    guest = run.results
    atr = openpgp.atr()
    assert run.run.atr == announce_t0(atr)
    assert_same(host, m, run, {atr: "<atr>", announce_t0(atr): "<atr>"},
                only=range(1, 1 + len(OPENPGP_COMPARED)))
    card_status = guest[len(OPENPGP_COMPARED)].output
    assert "Version ..........: 3.4" in card_status
    groups = [fingerprint.hex().upper()[i:i + 4] for i in range(0, 40, 4)]
    assert f"Signature key ....: {' '.join(groups[:5])}  {' '.join(groups[5:])}" in card_status
    assert host[0].output.endswith("\nYubikey 5 (OpenPGP v3.4) (0006 12345678)\n")
    assert guest[0].output.endswith("\nOpenPGP card v3.4 (0006 12345678)\n")
    verify_gpg_signature(tmp_path / "guest", guest, fingerprint.hex().upper())
    verify_gpg_signature(tmp_path / "host", host, fingerprint.hex().upper())


# -- the PIV card -----------------------------------------------------------------------

PIV_SIGNED = "signed with PIV in the guest"
PIV_COMPARED = ["opensc-tool -n", "pkcs15-tool -D", f"pkcs11-tool --module {PKCS11} -L -O",
                "pkcs15-tool --read-certificate 01"]
PIV_SIGN = (f"d=$(mktemp -d); echo '{PIV_SIGNED}' > $d/data; pkcs11-tool --module {PKCS11}"
            f" --login --pin {piv.PIN.decode()} --sign --id 01 -m ECDSA-SHA256 -i $d/data"
            " -o $d/sig && od -An -tx1 -v $d/sig")


def verify_piv_signature(result: CommandResult, card_keys: Path) -> None:
    assert result.rc == 0, masked(result.output)
    raw = bytes.fromhex("".join(re.findall(r"^(?: [0-9a-f]{2})+$", result.output, re.M)
                               ).replace(" ", ""))
    assert len(raw) == 64, masked(result.output)
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                     int.from_bytes(raw[32:], "big"))
    pub = ensure_keys(card_keys).piv_9a_cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(der, (PIV_SIGNED + "\n").encode(), ec.ECDSA(hashes.SHA256()))


def test_piv_card_opensc_and_pkcs11_in_the_guest_match_the_host(
    own_card, middleware, card_keys: Path
) -> None:
    card = own_card(piv.spec(card_keys))
    m = middleware(card.reader)
    commands = [*PIV_COMPARED, PIV_SIGN]
    host = m.on_host(commands)
    assert "Personal Identity Verification Card" in host[0].output
    verify_piv_signature(host[-1], card_keys)
    fresh(card)
    run = m.in_guest(commands)
    assert_same(host, m, run, {piv.ATR: "<atr>", announce_t0(piv.ATR): "<atr>"},
                only=range(len(PIV_COMPARED)))
    verify_piv_signature(run.results[-1], card_keys)


# -- the strict T=1 card ------------------------------------------------------------------

SELECT_T1 = "00A4040007" + strict_t1.AID.hex().upper()


def test_strict_t1_case4_data_reaches_the_guest_as_61xx_and_get_response(
    own_card, middleware
) -> None:
    card = own_card(strict_t1.spec())
    m = middleware(card.reader)
    # OpenSC on the host sends Le (T=1); in the guest its T=0 stack drops it.
    compared = [f"opensc-tool -s {SELECT_T1}00", "opensc-tool -s 0088000004DEADBEEF00"]
    host = m.on_host(compared)
    assert "Received (SW1=0x90, SW2=0x00):\n6F 1C 84 07" in host[0].output
    fresh(card)
    raw = ("steps=wait-card,connect,apdu:" + SELECT_T1 + f",apdu:00C00000{len(strict_t1.fci()):02X}"
           " /usr/bin/ccidt-client")
    run = m.in_guest([*compared, raw])
    assert_same(host, m, run, {strict_t1.ATR: "<atr>", announce_t0(strict_t1.ATR): "<atr>"},
                only=range(len(compared)))
    # The raw PC/SC client sees what a T=0 card gives: 61xx, then the data on GET RESPONSE.
    n = len(strict_t1.fci())
    apdus = [(c.upper(), r.upper())
             for c, r in re.findall(r"CCIDT apdu (\w+) -> (\w+)", run.results[-1].output)]
    assert apdus == [(SELECT_T1, f"61{n:02X}"),
                     (f"00C00000{n:02X}", strict_t1.fci().hex().upper() + "9000")], run.results[-1]


def test_openpgp_card_pkcs11_decrypt_in_the_guest(own_card, middleware, card_keys: Path) -> None:
    """PSO:DECIPHER carries 257 bytes, more than a short APDU: OpenSC in the guest
    must chain it in short links, which needs the extended-length bit cleared in
    the ATR and 5F52 (P1) and 7F66 capped (P2) (protocol/VSCARD.md#P1, #P2)."""
    card = own_card(openpgp.spec(card_keys))
    m = middleware(card.reader)
    secret = b"a session key, say"
    cipher = ensure_keys(card_keys).openpgp["dec"].public_key().encrypt(secret, padding.PKCS1v15())
    decrypt = (f"d=$(mktemp -d); echo {cipher.hex()} | xxd -r -p > $d/c; pkcs11-tool --module"
               f" {PKCS11} --token-label 'OpenPGP card (User PIN)' --login --pin"
               f" {openpgp.PW1.decode()} --decrypt --id 02 -m RSA-PKCS -i $d/c -o $d/p"
               " && echo plain=$(xxd -p $d/p)")
    host = m.on_host([decrypt])
    assert f"plain={secret.hex()}" in host[0].output, masked(host[0].output)
    fresh(card)
    (guest,) = m.in_guest([decrypt]).results
    assert f"plain={secret.hex()}" in guest.output, masked(guest.output)


# -- the switches: with a rule kept off, the guest fails as without the bridge's help -----


def test_keeping_ext_length_off_brings_back_gnupgs_not_supported(own_card, middleware,
                                                                  card_keys: Path) -> None:
    """The control for P1 (protocol/VSCARD.md#P1), through <reader keep='ext-length'>:
    scdaemon then sees a T=0 reader and a card that wants extended APDUs."""
    card = own_card(openpgp.spec(card_keys))
    m = middleware(card.reader, keep="ext-length")
    run = m.in_guest(["gpg --card-status"])
    status = run.results[0]
    assert status.rc != 0 and "Not supported" in status.output, status.output
    assert m.bridge is not None and "presentation rule ext-length" not in m.bridge.text()
