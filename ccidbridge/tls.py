"""TLS for tcp chardevs (``<source tls='yes'>``): the bridge's side of QEMU's
``tls-creds-x509``, with mutual authentication.

One function builds the context from a ``<tls dir=...>``, so the config check
(``ccidbridge check``) and the running bridge load the same files the same
way: a missing CA, an unreadable file, a key that does not match its
certificate is a config error before anything runs.

T1  Both sides present a certificate from the CA in ``ca-cert.pem`` and
    verify the other's (QEMU's ``verify-peer=on``).
T2  When the bridge connects, QEMU's certificate must name the host the
    config connects to (DNS name or IP address).
T3  With ``peer-names=``, the peer's certificate must also carry one of those
    names (subject CN or a DNS subjectAltName).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping

from ccidbridge.spec import TlsSpec

CA = "ca-cert.pem"


class TlsFilesError(Exception):
    """The ``<tls>`` files cannot be used; ``str()`` says which and why."""


def files(spec: TlsSpec, listens: bool) -> tuple[str, str, str]:
    """(CA, certificate, key) paths in QEMU's layout for this direction."""
    role = "server" if listens else "client"
    return (
        os.path.join(spec.dir, CA),
        os.path.join(spec.dir, f"{role}-cert.pem"),
        os.path.join(spec.dir, f"{role}-key.pem"),
    )


def context(spec: TlsSpec, listens: bool) -> ssl.SSLContext:
    """The bridge's SSL context (T1, T2); raises TlsFilesError naming the file."""
    ca, cert, key = files(spec, listens)
    for path in (ca, cert, key):
        if not os.path.isfile(path):
            raise TlsFilesError(f"{path} is missing (QEMU's layout: {CA}, "
                                f"{os.path.basename(cert)}, {os.path.basename(key)})")
        if not os.access(path, os.R_OK):
            raise TlsFilesError(f"{path} is not readable")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if listens else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # T1: QEMU must show a certificate too
    ctx.check_hostname = not listens  # T2
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFilesError(f"{ca}: not a usable CA certificate ({_why(exc)})") from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsFilesError(f"{key} does not belong to {cert}") from None
        raise TlsFilesError(f"{cert} / {key}: not a usable certificate and key "
                            f"({_why(exc)})") from None
    except OSError as exc:
        raise TlsFilesError(f"{cert} / {key}: {_why(exc)}") from None
    return ctx


def peer_name_problem(sock: ssl.SSLSocket, spec: TlsSpec) -> str | None:
    """T3 after a completed handshake: None if the peer is accepted, else why not."""
    if not spec.peer_names:
        return None
    names = certificate_names(sock.getpeercert() or {})
    if any(n in spec.peer_names for n in names):
        return None
    return (f"its certificate names {', '.join(names) or 'nobody'}, "
            f"not one of peer-names='{' '.join(spec.peer_names)}'")


def certificate_names(cert: Mapping[str, object]) -> list[str]:
    names: list[str] = []
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    for kind, value in cert.get("subjectAltName", ()):  # type: ignore[attr-defined]
        if kind in ("DNS", "IP Address"):
            names.append(value)
    return names


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
