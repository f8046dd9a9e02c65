"""Render a Layout as the QEMU arguments libvirt builds for those devices.

Pure.  The rules (docs/libvirt-facts.md#L10 .. #L13; qemu_command.c, checked with
``virsh domxml-to-native``):

* order: ccid controllers (``usb-ccid``) after the USB controller, then the
  smartcard (TLS object, chardev, card device), then the channels (chardev,
  ``virtserialport``); the extra cards come last, as ``<qemu:commandline>``
  arguments do;
* ``-device`` is JSON for QEMU >= 7.0 (capability device.json+hotplug, libvirt
  >= 8.1), key=value before, with the same key order; ``-object`` is JSON for
  QEMU >= 6.0 (object.qapified); ``-chardev`` is always key=value;
* in key=value values commas are doubled; JSON needs no escaping;
* a listening socket gets ``server=on,wait=off``; ``telnet=on`` comes first;
  ``reconnect=<s>``, or ``reconnect-ms=<ms>`` when both QEMU and libvirt know it
  (ccidbridge.config.versions, docs/libvirt-facts.md#L31); TLS adds ``-object
  tls-creds-x509`` (endpoint client or server, verify-peer true, dir
  /etc/pki/qemu) and ``tls-creds=``; the log goes last;
* the spicevmc sub-channel is ``smartcard`` for a card, ``vdagent`` for a channel;
* the whole line is shell-quoted as virsh prints it: an argument is wrapped in
  single quotes only when it holds a shell metacharacter.

The extra cards' arguments are the very strings ``<qemu:commandline>`` carries;
they depend on the QEMU version like libvirt's own (see ``extra_card_args``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ccidbridge.config.layout import Layout, PlacedCard, PlacedChannel, usb_bus
from ccidbridge.config.model import DEFAULT_NSS_DB, DEFAULT_TLS_DIR, Chardev
from ccidbridge.config.versions import NEWEST, T1_PROPERTY, QemuVersion, Target, Versions
from ccidbridge.config.vocabulary import SPICE_AGENT_NAME

__all__ = ["NEWEST", "QemuVersion", "Target", "argv", "card_args", "extra_card_args", "render",
           "shell_line", "shell_quote"]

Props = list[tuple[str, object]]


_SHELL_SPECIAL = set("\r\t\n !\"#$&'()*;<>?[\\]^`{|}~")


def shell_quote(arg: str) -> str:
    """virBufferEscapeShell: quote only when the argument holds a metacharacter."""
    if arg and not (set(arg) & _SHELL_SPECIAL):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def shell_line(args: Iterable[str]) -> str:
    return " ".join(shell_quote(a) for a in args)


def _kv_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace(",", ",,")


def _kv(first: str, props: Props) -> str:
    return ",".join([first.replace(",", ",,"), *(f"{k}={_kv_value(v)}" for k, v in props)])


def _json(props: Props) -> str:
    return json.dumps(dict(props), separators=(",", ":"), ensure_ascii=False)


def device(driver: str, props: Props, version: Versions) -> list[str]:
    """``-device`` in the syntax ``version`` gets from libvirt."""
    if version.json_device:
        return ["-device", _json([("driver", driver), *props])]
    return ["-device", _kv(driver, props)]


def tls_object(alias: str, listens: bool, json_syntax: bool) -> list[str]:
    """qemuBuildTLSx509CommandLine for a chardev's TLS credentials."""
    props: Props = [
        ("id", f"obj{alias}_tls0"),
        ("dir", DEFAULT_TLS_DIR),
        ("endpoint", "server" if listens else "client"),
        ("verify-peer", True),
    ]
    if json_syntax:
        return ["-object", _json([("qom-type", "tls-creds-x509"), *props])]
    return ["-object", _kv("tls-creds-x509", props)]


def uses_tls(chardev: Chardev) -> bool:
    src = chardev.source
    return chardev.type == "tcp" and src is not None and src.tls is True


def chardev_arg(chardev: Chardev, alias: str, spice_name: str,
                version: Versions) -> str:
    """qemuBuildChardevStr: the ``-chardev`` value (always key=value)."""
    kind = chardev.type
    src = chardev.source
    props: Props = [("id", alias)]
    backend = kind
    if kind in ("tcp", "unix"):
        assert src is not None
        backend = "socket"
        if kind == "tcp":
            props += [("host", src.host), ("port", src.service)]
            if chardev.protocol == "telnet":
                props.append(("telnet", True))
        else:
            props.append(("path", src.path))
        if src.mode == "bind":
            props += [("server", True), ("wait", False)]
        if src.reconnect is not None:
            seconds = src.reconnect.timeout if src.reconnect.enabled else 0
            assert seconds is not None
            if version.reconnect_ms:
                props.append(("reconnect-ms", seconds * 1000))
            else:
                props.append(("reconnect", seconds))
        if uses_tls(chardev):
            props.append(("tls-creds", f"obj{alias}_tls0"))
    elif kind == "udp":
        assert src is not None
        props += [("host", src.host), ("port", src.service)]
        local = chardev.source_for("bind")
        props += [("localaddr", (local and local.host) or ""),
                  ("localport", (local and local.service) or "0")]
    elif kind in ("file", "pipe", "dev"):
        assert src is not None
        backend = "serial" if kind == "dev" else kind
        props.append(("path", src.path))
        if kind == "file" and src.append is not None:
            props.append(("append", src.append))
    elif kind == "spicevmc":
        props.append(("name", spice_name))
    elif kind == "spiceport":
        assert src is not None
        props.append(("name", src.channel))
    if chardev.log_file is not None:
        props.append(("logfile", chardev.log_file))
        if chardev.log_append is not None:
            props.append(("logappend", chardev.log_append))
    return _kv(backend, props)


def _card_device(placed: PlacedCard) -> tuple[str, Props]:
    card = placed.card
    tail: Props = [("id", placed.alias), ("bus", placed.bus)]
    if card.mode == "host":
        return "ccid-card-emulated", [("backend", "nss-emulated"), *tail]
    if card.mode == "host-certificates":
        certs: Props = [(f"cert{i}", c) for i, c in enumerate(card.certificates, 1)]
        db = card.database or DEFAULT_NSS_DB
        return "ccid-card-emulated", [("backend", "certificates"), *certs, ("db", db), *tail]
    return "ccid-card-passthru", [("chardev", placed.chardev_alias), *tail]


def card_args(placed: PlacedCard, version: Versions) -> list[str]:
    """qemuBuildSmartcardCommandLine: [TLS object,] chardev, card device."""
    args: list[str] = []
    chardev = placed.card.chardev
    if chardev is not None:
        if uses_tls(chardev):
            src = chardev.source
            assert src is not None
            args += tls_object(placed.chardev_alias, src.mode == "bind", version.json_object)
        args += ["-chardev", chardev_arg(chardev, placed.chardev_alias, "smartcard", version)]
    driver, props = _card_device(placed)
    return args + device(driver, props, version)


def extra_card_args(placed: PlacedCard, version: Versions) -> list[str]:
    """An extra card's arguments, for ``<qemu:commandline>`` and the end of the argv.

    Same syntax as libvirt's own arguments for that QEMU: QEMU 7.2 creates every
    key=value ``-device`` before any JSON one, so a key=value card device would
    look for its ``ccidN.0`` bus before libvirt's JSON ``usb-ccid`` exists
    ("Bus 'ccid1.0' not found").
    """
    return card_args(placed, version)


def _channel_args(placed: PlacedChannel, version: Versions) -> list[str]:
    a = placed.address
    props: Props = [
        ("bus", f"virtio-serial{a.controller}.{a.bus}"),
        ("nr", a.port),
        ("chardev", placed.chardev_alias),
        ("id", placed.alias),
        ("name", placed.channel.target_name or SPICE_AGENT_NAME),
    ]
    return [
        "-chardev", _kv("spicevmc", [("id", placed.chardev_alias), ("name", "vdagent")]),
        *device("virtserialport", props, version),
    ]


def usb_ccid_overrides(version: Versions) -> Props:
    """usb-ccid properties ccidbridge sets beyond libvirt's own: ``x-t1-support=off`` when
    the QEMU offers it, so the guest never negotiates T=1 (docs/libvirt-facts.md#L33).  libvirt
    appends them as ``<qemu:override>`` frontend properties (libvirt_xml.override_lines)."""
    return [(T1_PROPERTY, False)] if version.usb_ccid_t1 else []


def usb_controller_args(version: Versions) -> list[str]:
    """The USB controller (``id=usb``) a bare QEMU needs; libvirt adds its own."""
    return device("qemu-xhci", [("id", "usb")], version)


def argv(lay: Layout, version: Versions, add_usb: bool = False) -> list[str]:
    """The device arguments, in libvirt's order."""
    args: list[str] = usb_controller_args(version) if add_usb else []
    for index in lay.virtio_serial:
        args += device("virtio-serial-pci", [("id", f"virtio-serial{index}")], version)
    for ctl in sorted(lay.controllers, key=lambda c: c.index):  # as listed once pasted
        props: Props = [("id", ctl.alias), ("bus", usb_bus(ctl.usb.bus)),
                        ("port", ctl.usb.port), *usb_ccid_overrides(version)]
        args += device("usb-ccid", props, version)
    if lay.libvirt_card is not None:
        args += card_args(lay.libvirt_card, version)
    for ch in lay.channels:
        args += _channel_args(ch, version)
    for placed in lay.extra_cards:
        args += extra_card_args(placed, version)
    return args


def render(lay: Layout, version: Versions, add_usb: bool = False) -> str:
    """What ``ccidbridge qemu-argv`` prints: one shell-quoted line."""
    return shell_line(argv(lay, version, add_usb)) + "\n"
