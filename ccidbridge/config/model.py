"""The config model: what a ccidbridge XML file says, independent of XML.

The parser (``ccidbridge.config.parse``) builds these; the renderers
(``ccidbridge.config.libvirt_xml``, ``ccidbridge.config.qemu_argv``) and the
bridge runtime only ever read them.  All classes are frozen.

This module starts with the runtime-facing part (what ``ccidbridge run``
needs to serve one passthrough card); the libvirt device model is below it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Share(str, Enum):  # noqa: UP042 (the runtime's API)
    """How the bridge holds the host card (``<reader share=...>``)."""

    EXCLUSIVE = "exclusive"  # SCARD_SHARE_EXCLUSIVE: other host programs get a sharing violation
    SHARED = "shared"  # SCARD_SHARE_SHARED, each guest APDU inside Begin/EndTransaction


class Protocol(str, Enum):  # noqa: UP042 (the runtime's API)
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
    protocol: Protocol = Protocol.ANY
    rewrite_atr: bool = True  # announce T=0 to QEMU's T=0-only reader (``rewrite-atr='no'`` off)
    apdu_timeout: float = 30.0  # seconds before a silent card's APDU is failed (``timeout=``)
    #: presentation rules switched off for this card (``keep='ext-length le'``,
    #: names from ccidbridge.protocol.presentation.RULES, or ``all``)
    keep: frozenset[str] = frozenset()
    line: int = 0  # line of the <reader> (or <smartcard>) element, for messages


@dataclass(frozen=True)
class Endpoint:
    """Where the bridge meets QEMU's chardev for one passthrough card.

    libvirt's ``<source mode='bind'>`` means QEMU listens, so the bridge
    connects (``bridge_listens=False``); ``mode='connect'`` (libvirt's default)
    means QEMU connects and the bridge listens.
    """

    kind: str  # "tcp" or "unix"
    bridge_listens: bool
    host: str | None = None  # tcp
    port: int | None = None  # tcp
    path: str | None = None  # unix

    def describe(self) -> str:
        where = f"{self.host}:{self.port}" if self.kind == "tcp" else self.path
        return f"{self.kind} {where} ({'listening' if self.bridge_listens else 'connecting'})"


@dataclass(frozen=True)
class ServedCard:
    """One passthrough smartcard that ``ccidbridge run`` serves."""

    label: str  # e.g. "vm.xml:3 smartcard0" — used in every log line about this card
    endpoint: Endpoint
    reader: ReaderSpec
    source_file: str = ""
    line: int = 0


# --------------------------------------------------------------------------------------------
# The libvirt device model: what the <controller>, <smartcard> and <channel> children of
# <ccidbridge> say, in libvirt 9.0's vocabulary (docs/formatdomain.rst, domaincommon.rng).

SMARTCARD_MODES = ("host", "host-certificates", "passthrough")
TCP_PROTOCOLS = ("raw", "telnet", "telnets", "tls")
DEFAULT_NSS_DB = "/etc/pki/nssdb"  # libvirt's db= when <database> is absent
DEFAULT_TLS_DIR = "/etc/pki/qemu"  # qemu.conf default_tls_x509_cert_dir on Debian
SPICE_AGENT_NAME = "com.redhat.spice.0"  # the only spicevmc channel target name QEMU takes


@dataclass(frozen=True)
class Reconnect:
    """``<reconnect enabled='yes|no' timeout='N'/>`` inside a connect-mode ``<source>``."""

    enabled: bool
    timeout: int | None = None  # seconds; required (and > 0) when enabled


@dataclass(frozen=True)
class CharSource:
    """One chardev ``<source>`` (libvirt's ``qemucdevSrcDef``)."""

    mode: str = "connect"  # "bind" or "connect"; libvirt's default is connect
    host: str | None = None
    service: str | None = None
    path: str | None = None
    channel: str | None = None  # spiceport
    append: bool | None = None  # file
    tls: bool | None = None  # tcp only; None: qemu.conf decides (chardev_tls, default off)
    reconnect: Reconnect | None = None
    line: int = 0


@dataclass(frozen=True)
class Chardev:
    """The character device of a passthrough smartcard (``type=`` plus its children)."""

    type: str
    sources: tuple[CharSource, ...] = ()  # udp: bind and connect; otherwise at most one
    protocol: str | None = None  # tcp only; None prints as libvirt's default 'raw'
    log_file: str | None = None
    log_append: bool | None = None

    @property
    def source(self) -> CharSource | None:
        """The single source (the connect one for udp)."""
        for src in self.sources:
            if src.mode == "connect":
                return src
        return self.sources[0] if self.sources else None

    def source_for(self, mode: str) -> CharSource | None:
        return next((s for s in self.sources if s.mode == mode), None)


@dataclass(frozen=True)
class UsbAddress:
    """``<address type='usb' bus='B' port='P'/>`` of a ccid controller."""

    bus: int
    port: str  # "1" or a hub path "1.2"


@dataclass(frozen=True)
class CcidController:
    """``<controller type='ccid' index='N'>``: one QEMU ``usb-ccid`` device."""

    index: int | None = None  # None: libvirt assigns the lowest free index
    usb: UsbAddress | None = None
    line: int = 0


@dataclass(frozen=True)
class CcidAddress:
    """``<address type='ccid' controller='C' slot='S'/>`` of a smartcard."""

    controller: int
    slot: int | None = None


@dataclass(frozen=True)
class Smartcard:
    """One ``<smartcard>``; ``reader`` is ccidbridge's own host-side element."""

    mode: str  # one of SMARTCARD_MODES
    certificates: tuple[str, ...] = ()  # host-certificates: exactly three NSS nicknames
    database: str | None = None  # host-certificates: absolute NSS db directory
    chardev: Chardev | None = None  # passthrough
    address: CcidAddress | None = None
    reader: ReaderSpec | None = None  # passthrough only
    line: int = 0


@dataclass(frozen=True)
class VirtioSerialAddress:
    controller: int
    bus: int
    port: int


@dataclass(frozen=True)
class SpiceChannel:
    """``<channel type='spicevmc'><target type='virtio' [name=...]/></channel>``."""

    target_name: str | None = None  # None: libvirt keeps it absent, QEMU gets the default
    address: VirtioSerialAddress | None = None
    line: int = 0


@dataclass(frozen=True)
class Devices:
    """Everything a config declares, in document order."""

    controllers: tuple[CcidController, ...] = ()
    smartcards: tuple[Smartcard, ...] = ()
    channels: tuple[SpiceChannel, ...] = ()


@dataclass(frozen=True)
class Config:
    """A loaded ccidbridge config (see ``ccidbridge.config.load``)."""

    path: str
    devices: Devices

    def served_cards(self) -> list[ServedCard]:
        """The passthrough cards ``ccidbridge run`` serves, one per reachable socket chardev."""
        from ccidbridge.config.serving import served_cards

        return served_cards(self)

    def unserved(self) -> list[tuple[str, str]]:
        """``(label, reason)`` for every device the bridge does not serve."""
        from ccidbridge.config.serving import unserved

        return unserved(self)
