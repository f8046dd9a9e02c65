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


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); an end entity signs and enciphers."""
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False,
        key_encipherment=not cert_sign, data_encipherment=False, key_agreement=False,
        key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    days: tuple[int, int],
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """One certificate valid from ``days[0]`` to ``days[1]`` days from now."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW + datetime.timedelta(days=days[0]))
        .not_valid_after(_NOW + datetime.timedelta(days=days[1]))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


class Pki:
    """One certificate authority and the credentials it issues."""

    def __init__(self, directory: Path, name: str = "ccidbridge test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        self.cert = _certificate(_name(name), _name(name), self.key, self.key, (-1, 30), [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (_usage(cert_sign=True), True),
        ])
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
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        eku = ExtendedKeyUsageOID
        usage = eku.SERVER_AUTH if role == "server" else eku.CLIENT_AUTH
        cert = _certificate(_name(name), self.cert.subject, key, self.key,
                            (-10, -1) if expired else (-1, 30), [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_usage(cert_sign=False), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (x509.SubjectAlternativeName([alt]), False),
        ])
        (out / "ca-cert.pem").write_bytes(self.ca_pem)
        (out / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = out / f"{role}-key.pem"
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return out
