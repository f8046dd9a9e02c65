"""The test cards' key material: PEM files in one directory, made once, then reused.

A test (or ``python -m lab.cards.keys DIR``) calls :func:`ensure_keys` on a
directory; every card started with ``--key-dir DIR`` (or ``key_dir=DIR``)
loads the same keys, so the test can verify what the card signed.  Files
(all PEM, private keys unencrypted PKCS#8):

=====================  ======================================================
``openpgp-sig.pem``    OpenPGP signature key (RSA-2048), PSO:CDS
``openpgp-dec.pem``    OpenPGP decryption key (RSA-2048), PSO:DECIPHER
``openpgp-aut.pem``    OpenPGP authentication key (RSA-2048), INTERNAL AUTH.
``openpgp-aut.crt``    self-signed X.509 certificate of the authentication
                       key: the cardholder certificate DO 7F21 (> 256 bytes)
``piv-9a.pem``         PIV authentication key, slot 9A (ECC P-256)
``piv-9a.crt``         its self-signed X.509 certificate (> 256 bytes)
=====================  ======================================================

Files are written atomically (temp file + rename), so a card process that
starts while the test is still generating never reads half a key.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

RsaKey = rsa.RSAPrivateKey
EcKey = ec.EllipticCurvePrivateKey

OPENPGP_SLOTS = ("sig", "dec", "aut")
#: Validity of the self-signed certificates: fixed, so reruns give equal fields.
CERT_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
CERT_NOT_AFTER = datetime.datetime(2044, 1, 1, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class CardKeys:
    openpgp: dict[str, RsaKey]
    openpgp_aut_cert: x509.Certificate
    piv_9a: EcKey
    piv_9a_cert: x509.Certificate


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pem(key: RsaKey | EcKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> RsaKey | EcKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an RSA or EC private key")
    return key


def self_signed(key: RsaKey | EcKey, common_name: str) -> x509.Certificate:
    """A CA-less self-signed certificate with the usual end-entity extensions."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ccidbridge test cards"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(CERT_NOT_BEFORE)
        .not_valid_after(CERT_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _key(path: Path, make: type[RsaKey] | type[EcKey]) -> RsaKey | EcKey:
    if path.exists():
        return _load_key(path)
    key: RsaKey | EcKey
    if make is rsa.RSAPrivateKey:
        key = rsa.generate_private_key(65537, 2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    _write(path, _pem(key))
    return key


def _cert(path: Path, key: RsaKey | EcKey, cn: str) -> x509.Certificate:
    if path.exists():
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if cert.public_key() == key.public_key():
            return cert
    cert = self_signed(key, cn)
    _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def ensure_keys(key_dir: Path | str) -> CardKeys:
    """Load the keys in ``key_dir``, generating (and saving) whatever is missing."""
    d = Path(key_dir)
    d.mkdir(parents=True, exist_ok=True)
    pgp: dict[str, RsaKey] = {}
    for slot in OPENPGP_SLOTS:
        k = _key(d / f"openpgp-{slot}.pem", rsa.RSAPrivateKey)
        if not isinstance(k, rsa.RSAPrivateKey):
            raise ValueError(f"{d}/openpgp-{slot}.pem: the OpenPGP card needs an RSA key")
        pgp[slot] = k
    aut_cert = _cert(d / "openpgp-aut.crt", pgp["aut"], "OpenPGP test card authentication")
    piv = _key(d / "piv-9a.pem", ec.EllipticCurvePrivateKey)
    if not isinstance(piv, ec.EllipticCurvePrivateKey) or piv.curve.name != "secp256r1":
        raise ValueError(f"{d}/piv-9a.pem: the PIV card needs an ECC P-256 key")
    piv_cert = _cert(d / "piv-9a.crt", piv, "PIV test card authentication")
    return CardKeys(pgp, aut_cert, piv, piv_cert)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lab.cards.keys DIR")
    ensure_keys(sys.argv[1])
    print(sys.argv[1])
