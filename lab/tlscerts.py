"""x509 files for TLS tests, in QEMU's ``tls-creds-x509`` layout, made with ``cryptography``.

``Pki(directory)`` is one CA; ``pki.creds(name, role, ...)`` writes a directory
with ``ca-cert.pem`` and ``ROLE-cert.pem`` + ``ROLE-key.pem`` (role ``server``
or ``client``), the certificate naming ``name`` (CN and subjectAltName, an IP
address when it looks like one).  The extensions are the ones QEMU's GnuTLS
checks insist on: CA basicConstraints + keyCertSign, and serverAuth/clientAuth.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """One certificate authority and the credentials it issues."""

    def __init__(self, directory: Path, name: str = "ccidbridge test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def creds(
        self,
        name: str,
        role: str,
        *,
        expired: bool = False,
        subdir: str | None = None,
    ) -> Path:
        """A directory in QEMU's layout holding this CA and a ``role`` certificate for ``name``."""
        assert role in ("server", "client")
        out = self.directory / (subdir or f"{role}-{name}{'-expired' if expired else ''}")
        out.mkdir(parents=True, exist_ok=True)
        key = _key()
        if expired:
            start, end = _NOW - datetime.timedelta(days=10), _NOW - datetime.timedelta(days=1)
        else:
            start, end = _NOW - datetime.timedelta(days=1), _NOW + datetime.timedelta(days=30)
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        eku = ExtendedKeyUsageOID
        usage = eku.SERVER_AUTH if role == "server" else eku.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        (out / "ca-cert.pem").write_bytes(self.ca_pem)
        (out / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = out / f"{role}-key.pem"
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return out
