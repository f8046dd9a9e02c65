"""What the runtime and the card side are given to serve: neutral types, no config, no IO.

``ccidbridge.config`` builds these from a config file; ``ccidbridge.runtime``
and ``ccidbridge.card`` only read them.  Neither side imports the other's
package for them, so there is no import circle.  All classes are frozen.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum


def is_loopback(host: str | None) -> bool:
    """True if ``host`` names this machine only (no host: QEMU's default, localhost)."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Share(str, Enum):  # noqa: UP042 (str values are the config's words)
    """How the bridge holds the host card (``<reader share=...>``)."""

    EXCLUSIVE = "exclusive"  # SCARD_SHARE_EXCLUSIVE: other host programs get a sharing violation
    SHARED = "shared"  # SCARD_SHARE_SHARED, each guest APDU inside Begin/EndTransaction


class CardProtocol(str, Enum):  # noqa: UP042 (str values are the config's words)
    """Which protocol the bridge asks PC/SC for (``<reader protocol=...>``)."""

    ANY = "any"
    T0 = "T0"
    T1 = "T1"


@dataclass(frozen=True)
class ReaderSpec:
    """ccidbridge's own ``<reader>``: which host PC/SC reader feeds the card.

    With neither ``name`` nor ``match``: the first reader holding a card.
    """

    name: str | None = None  # exact PC/SC reader name
    match: str | None = None  # fnmatch-style glob over reader names
    atr: bytes | None = None  # only a card with exactly this ATR is served
    atr_mask: bytes | None = None  # optional mask for ``atr`` (same length)
    share: Share = Share.EXCLUSIVE
    protocol: CardProtocol = CardProtocol.ANY
    rewrite_atr: bool = True  # announce T=0 to QEMU's T=0-only reader (``rewrite-atr='no'`` off)
    apdu_timeout: float = 30.0  # seconds before a silent card's APDU is failed (``timeout=``)
    #: presentation rules switched off for this card (``keep='ext-length le'``,
    #: names from ccidbridge.protocol.presentation.RULES, or ``all``)
    keep: frozenset[str] = frozenset()
    line: int = 0  # line of the <reader> (or <smartcard>) element, for messages


@dataclass(frozen=True)
class TlsSpec:
    """ccidbridge's own ``<tls dir=...>``: the bridge's x509 files, in QEMU's layout
    (``ca-cert.pem``; ``client-cert.pem`` + ``client-key.pem`` when the bridge
    connects, ``server-cert.pem`` + ``server-key.pem`` when it listens)."""

    dir: str
    peer_names: tuple[str, ...] = ()  # accepted names in the peer's certificate; () = any
    line: int = 0


@dataclass(frozen=True)
class Endpoint:
    """Where the bridge meets QEMU's chardev for one passthrough card.

    libvirt's ``<source mode='bind'>`` means QEMU listens, so the bridge
    connects (``bridge_listens=False``); ``mode='connect'`` (libvirt's default)
    means QEMU connects and the bridge listens (docs/libvirt-facts.md#L3).
    """

    kind: str  # "tcp" or "unix"
    bridge_listens: bool
    host: str | None = None  # tcp
    port: int | None = None  # tcp
    path: str | None = None  # unix
    tls: TlsSpec | None = None  # tcp with tls='yes'

    def describe(self) -> str:
        where = f"{self.host}:{self.port}" if self.kind == "tcp" else self.path
        kind = "tls" if self.tls is not None else self.kind
        return f"{kind} {where} ({'listening' if self.bridge_listens else 'connecting'})"


@dataclass(frozen=True)
class PinGuardSpec:
    """ccidbridge's own ``<pin-guard keep='N'/>``: refuse a PIN command while its
    counter is known to be at most ``keep`` (protocol/guard.py; 0 = off)."""

    keep: int = 1
    line: int = 0


@dataclass(frozen=True)
class PolicyRule:
    """One ``<allow>``/``<deny>`` of ``<policy>``: each field ``None`` matches anything.

    ``cla``..``p2`` are the byte values the rule matches (ranges and masks are
    expanded by the parser); ``aid`` is a DF-name prefix the selected
    application must have (protocol/policy.py says how a partial one matches).
    """

    allow: bool
    cla: frozenset[int] | None = None
    ins: frozenset[int] | None = None
    p1: frozenset[int] | None = None
    p2: frozenset[int] | None = None
    aid: bytes | None = None
    text: str = ""  # the rule as written, for the log
    line: int = 0


@dataclass(frozen=True)
class ApduPolicy:
    """ccidbridge's own ``<policy>``: rules in document order; no rule = allow all."""

    rules: tuple[PolicyRule, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class ServedCard:
    """One passthrough smartcard that ``ccidbridge run`` serves."""

    label: str  # e.g. "vm.xml:3 smartcard0" — used in every log line about this card
    endpoint: Endpoint
    reader: ReaderSpec
    pin_guard: PinGuardSpec = PinGuardSpec()
    policy: ApduPolicy = ApduPolicy()
    source_file: str = ""
    line: int = 0
