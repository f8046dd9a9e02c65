"""Render a Layout as libvirt's normal form (``virsh dumpxml --inactive``).

Pure text rendering, formatted exactly as libvirt's formatter prints devices
inside ``<devices>`` (4 spaces, single-quoted attributes, virBufferEscapeString
escaping).  The rules it follows (docs/libvirt-facts.md#L9; domain_conf.c
virDomainSmartcardDefFormat, virDomainChrSourceDefFormat,
virDomainControllerDefFormat):

* devices are grouped by kind: controllers, then smartcards, then channels;
  ccid controllers by index (as libvirt keeps them once pasted); libvirt adds
  the virtio-serial controller before a ccid controller it adds itself;
* a tcp chardev always prints ``<protocol type='raw'/>`` unless another
  protocol is set; other types drop ``<protocol>``;
* ``<source>`` attributes print in the order mode, host, service, path, tls;
  udp prints the bind source before the connect source;
* a pty source has no path in inactive XML;
* ``<reader>`` is ccidbridge's own and never printed.

The extra cards (beyond libvirt's one) come out as a ``<qemu:commandline>``
element that goes into ``<domain>`` itself, and so does a ``<qemu:override>``
when the QEMU's usb-ccid offers T=1.  The device lines are the same for
libvirt 9.0, 11.3 and 12.8 (tests/test_libvirt_oracle.py); only the layout's
USB ports differ (layout.py, docs/libvirt-facts.md#L32).
"""

from __future__ import annotations

from ccidbridge.config.layout import Layout, PlacedCard, PlacedChannel, PlacedController
from ccidbridge.config.model import Chardev, CharSource
from ccidbridge.config.qemu_argv import extra_card_args, usb_ccid_overrides
from ccidbridge.config.versions import Versions

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
INDENT = "    "  # where libvirt prints a device inside <devices>


def escape(value: str) -> str:
    """virBufferEscapeString: the five XML specials, in attributes and text alike."""
    return (
        value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        .replace('"', "&quot;").replace("'", "&apos;")
    )


def _attrs(**values: object) -> str:
    out = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        out.append(f" {name.replace('_', '-')}='{escape(str(value))}'")
    return "".join(out)


def _controller(ctl: PlacedController, portable: bool) -> list[str]:
    if portable and not ctl.usb_given:
        return [f"<controller type='ccid' index='{ctl.index}'/>"]
    return [
        f"<controller type='ccid' index='{ctl.index}'>",
        f"  <address type='usb' bus='{ctl.usb.bus}' port='{ctl.usb.port}'/>",
        "</controller>",
    ]


def _source(kind: str, src: CharSource) -> list[str]:
    if kind == "tcp":
        attrs = _attrs(mode=src.mode, host=src.host, service=src.service, tls=src.tls)
    elif kind == "udp":
        attrs = _attrs(mode=src.mode, host=src.host, service=src.service)
    elif kind == "unix":
        attrs = _attrs(mode=src.mode, path=src.path)
    elif kind == "file":
        attrs = _attrs(path=src.path, append=None if src.append is None
                       else ("on" if src.append else "off"))
    elif kind == "spiceport":
        attrs = _attrs(channel=src.channel)
    else:
        attrs = _attrs(path=src.path)
    if src.reconnect is None:
        return [f"<source{attrs}/>"]
    rc = src.reconnect
    return [
        f"<source{attrs}>",
        f"  <reconnect{_attrs(enabled=rc.enabled, timeout=rc.timeout if rc.enabled else None)}/>",
        "</source>",
    ]


def _chardev(chardev: Chardev) -> list[str]:
    lines: list[str] = []
    sources = chardev.sources
    if chardev.type == "udp":
        sources = tuple(s for s in sources if s.mode == "bind") + tuple(
            s for s in sources if s.mode == "connect"
        )
    if chardev.type != "pty":
        for src in sources:
            lines += _source(chardev.type, src)
    if chardev.type == "tcp":
        lines.append(f"<protocol type='{chardev.protocol or 'raw'}'/>")
    if chardev.log_file is not None:
        append = None if chardev.log_append is None else ("on" if chardev.log_append else "off")
        lines.append(f"<log{_attrs(file=chardev.log_file, append=append)}/>")
    return lines


def _smartcard(placed: PlacedCard) -> list[str]:
    card = placed.card
    body: list[str] = []
    if card.mode == "passthrough":
        assert card.chardev is not None
        head = f"<smartcard mode='passthrough' type='{card.chardev.type}'>"
        body += _chardev(card.chardev)
    else:
        head = f"<smartcard mode='{card.mode}'>"
        body += [f"<certificate>{escape(c)}</certificate>" for c in card.certificates]
        if card.database is not None:
            body.append(f"<database>{escape(card.database)}</database>")
    body.append(f"<address type='ccid' controller='{placed.controller}' slot='0'/>")
    return [head, *("  " + line for line in body), "</smartcard>"]


def _channel(placed: PlacedChannel, portable: bool) -> list[str]:
    a = placed.address
    target = f"  <target{_attrs(type='virtio', name=placed.channel.target_name)}/>"
    if portable and placed.channel.address is None:
        return ["<channel type='spicevmc'>", target, "</channel>"]
    return [
        "<channel type='spicevmc'>",
        target,
        f"  <address type='virtio-serial' controller='{a.controller}' bus='{a.bus}' "
        f"port='{a.port}'/>",
        "</channel>",
    ]


def device_lines(lay: Layout, portable: bool = False) -> list[str]:
    """The elements for ``<devices>``, without indentation.

    ``portable``: leave out what libvirt assigns by itself against the rest of
    the domain (USB ports, the virtio-serial controller and ports), so the
    output also fits a domain that already uses USB port 1 ("Duplicate USB
    address bus 0 port 1") or has a virtio-serial controller ("Multiple
    'virtio-serial' controllers with index '0'").
    """
    ccid = [ln for ctl in sorted(lay.controllers, key=lambda c: c.index)
            for ln in _controller(ctl, portable)]
    serial = [] if portable else [
        f"<controller type='virtio-serial' index='{i}'/>" for i in lay.virtio_serial]
    # libvirt adds the virtio-serial controller (for the channels) before the ccid one
    listed = any(ctl.line for ctl in lay.controllers)
    lines = ccid + serial if listed else serial + ccid
    if lay.libvirt_card is not None:
        lines += _smartcard(lay.libvirt_card)
    for ch in lay.channels:
        lines += _channel(ch, portable)
    return lines


def commandline_lines(lay: Layout, version: Versions) -> list[str]:
    """``<qemu:commandline>`` for the extra cards, or nothing."""
    if not lay.extra_cards:
        return []
    args = [arg for placed in lay.extra_cards for arg in extra_card_args(placed, version)]
    return [
        f"<qemu:commandline xmlns:qemu='{QEMU_NS}'>",
        *(f"  <qemu:arg value='{escape(a)}'/>" for a in args),
        "</qemu:commandline>",
    ]


def override_lines(lay: Layout, version: Versions) -> list[str]:
    """``<qemu:override>`` setting usb-ccid properties libvirt has no element for.

    libvirt (8.2 and later, JSON ``-device``) appends a frontend property to the
    device's JSON; this is how ``x-t1-support=off`` reaches a QEMU that offers it
    (qemu_argv.usb_ccid_overrides, docs/libvirt-facts.md#L33).
    """
    props = usb_ccid_overrides(version)
    if not props or not lay.controllers:
        return []
    lines = [f"<qemu:override xmlns:qemu='{QEMU_NS}'>"]
    for ctl in sorted(lay.controllers, key=lambda c: c.index):
        lines += [f"  <qemu:device alias='{ctl.alias}'>", "    <qemu:frontend>"]
        lines += [f"      <qemu:property name='{name}' type='bool' "
                  f"value='{'true' if value else 'false'}'/>" for name, value in props]
        lines += ["    </qemu:frontend>", "  </qemu:device>"]
    return lines + ["</qemu:override>"]


def domain_lines(lay: Layout, version: Versions) -> list[str]:
    """What goes into ``<domain>`` itself: the extra cards, then the usb-ccid overrides."""
    return commandline_lines(lay, version) + override_lines(lay, version)


def render(lay: Layout, version: Versions, portable: bool = False) -> str:
    """What ``ccidbridge libvirt [--portable]`` prints."""
    devices = [INDENT + line for line in device_lines(lay, portable)]
    extra = domain_lines(lay, version)
    if not extra:
        return "\n".join(devices) + "\n"
    why = []
    if lay.extra_cards:
        why.append(f"libvirt takes one <smartcard>; the other {len(lay.extra_cards)} go to "
                   "QEMU directly")
    if usb_ccid_overrides(version):
        why.append("this QEMU's usb-ccid offers T=1: x-t1-support=off keeps the guest on T=0")
    return "\n".join([
        "<!-- paste into the domain's <devices>: -->",
        *devices,
        f"<!-- paste into <domain> itself: {'; '.join(why)} -->",
        *("  " + line for line in extra),
    ]) + "\n"
