"""The config model: what a ccidbridge XML file's devices say, independent of XML.

The parser (``ccidbridge.config.parse``) builds these; the layout and the
renderers (``ccidbridge.config.libvirt_xml``, ``ccidbridge.config.qemu_argv``)
only ever read them.  All classes are frozen.  What the runtime is given
(reader spec, endpoint, served card) lives in the neutral ``ccidbridge.spec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.spec import ApduPolicy, PinGuardSpec, ReaderSpec, TlsSpec

# The <controller>, <smartcard> and <channel> children of <ccidbridge>, in libvirt 9.0's
# vocabulary (config/vocabulary.py states which attributes and values each takes).

DEFAULT_NSS_DB = "/etc/pki/nssdb"  # libvirt's db= when <database> is absent
DEFAULT_TLS_DIR = "/etc/pki/qemu"  # qemu.conf default_tls_x509_cert_dir on Debian


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
    service: str | None = None  # as written (libvirt prints it back unchanged)
    port: int | None = None  # ``service`` resolved once by the parser (a number or a name)
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

    mode: str  # one of vocabulary.SMARTCARD_MODES
    certificates: tuple[str, ...] = ()  # host-certificates: exactly three NSS nicknames
    database: str | None = None  # host-certificates: absolute NSS db directory
    chardev: Chardev | None = None  # passthrough
    address: CcidAddress | None = None
    reader: ReaderSpec | None = None  # passthrough only
    tls: TlsSpec | None = None  # passthrough over tcp with tls='yes': the bridge's x509 files
    cleartext_network: bool = False  # <cleartext network='yes'/>: accepted without TLS off-host
    pin_guard: PinGuardSpec | None = None  # passthrough: <pin-guard keep='N'/>, None = default
    policy: ApduPolicy | None = None  # passthrough: <policy>, None = no rules
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
