"""From a ``<ccidbridge>`` document to the frozen model, with libvirt 9.0's checks.

Which elements, attributes and values exist is vocabulary.py's; this module
checks each element against its entry there (messages included) and adds the
rules across attributes and devices.  Each check names the libvirt rule it
mirrors (domain_conf.c's parser, the QEMU driver's validator qemu_validate.c,
or domaincommon.rng; docs/libvirt-facts.md#L1) and reports ``FILE:LINE: what is
wrong, what is allowed``.  Where libvirt accepts something that cannot work (a
relative unix socket path, an out-of-range port), the check is stricter and
says why.  Every value is resolved here, once (a service name to its port).
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import replace

from lxml import etree

from ccidbridge import tls
from ccidbridge.config.document import Document
from ccidbridge.config.errors import ConfigError
from ccidbridge.config.model import (
    CcidAddress,
    CcidController,
    Chardev,
    CharSource,
    Devices,
    Reconnect,
    Smartcard,
    SpiceChannel,
    UsbAddress,
    VirtioSerialAddress,
)
from ccidbridge.config.vocabulary import (
    CHARDEV_TYPES,
    ELEMENTS,
    LIBVIRT_CHARDEV_TYPES,
    RECONNECT_TYPES,
    SMARTCARD_BY_MODE,
    SOURCE_BY_TYPE,
    SPICE_AGENT_NAME,
    Element,
)
from ccidbridge.protocol.presentation import RULES as PRESENTATION_RULES
from ccidbridge.spec import (
    ApduPolicy,
    CardProtocol,
    PinGuardSpec,
    PolicyRule,
    ReaderSpec,
    Share,
    TlsSpec,
)

_HEX = re.compile(r"[0-9a-fA-F]*")
E = ELEMENTS
#: sockaddr_un.sun_path is 108 bytes on Linux, its terminating NUL included.
MAX_UNIX_PATH = 107


class _Reader:
    """Element helpers that check against the vocabulary and raise ConfigError with the line."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.path = doc.path

    def line(self, node: etree._Element) -> int:
        return self.doc.line(node)

    def fail(self, node: etree._Element, message: str) -> ConfigError:
        return ConfigError(self.path, self.line(node), message)

    def fail_at(self, line: int, message: str) -> ConfigError:
        return ConfigError(self.path, line or None, message)

    def attrs(self, node: etree._Element, spec: Element,
              only: tuple[str, ...] | None = None) -> None:
        """Every attribute of ``node`` is one ``spec`` (or ``only``) names."""
        allowed = spec.names if only is None else only
        for name in node.attrib:
            if name not in allowed:
                what = ", ".join(allowed) if allowed else "none"
                raise self.fail(
                    node, f"<{node.tag}> has no attribute '{name!s}' here; allowed: {what}"
                )

    def children(self, node: etree._Element, spec: Element,
                 only: tuple[str, ...] | None = None) -> Iterator[etree._Element]:
        """The child elements of ``node``, each one ``spec`` (or ``only``) allows."""
        allowed = spec.children if only is None else only
        text = (node.text or "").strip()
        if not spec.text and text:
            raise self.fail(node, f"<{node.tag}> holds text {text!r}; "
                            "it takes only attributes and child elements")
        for child in node:
            if not isinstance(child.tag, str):  # comment or processing instruction
                continue
            if child.tag not in allowed:
                what = ", ".join(f"<{a}>" for a in allowed) if allowed else "no child elements"
                raise self.fail(child, f"unexpected <{child.tag}> inside <{node.tag}>; "
                                f"allowed: {what}")
            tail = (child.tail or "").strip()
            if not spec.text and tail:
                raise self.fail(child, f"stray text {tail!r} after <{child.tag}>")
            yield child

    def leaf(self, node: etree._Element, spec: Element) -> None:
        """``node``'s attributes and (no) children, for an element without children."""
        self.attrs(node, spec)
        list(self.children(node, spec))

    def value(self, node: etree._Element, spec: Element, name: str) -> str | None:
        """Attribute ``name`` checked against the vocabulary (its default when absent)."""
        attr = spec.attr(name)
        value: str | None = node.get(name)
        if value is None:
            return attr.default
        if attr.kind == "enum" and value not in attr.values:
            libvirt = attr.libvirt.format(value=value)
            raise self.fail(node, f"<{node.tag} {name}='{value}'> is not valid; allowed: "
                            + "|".join(attr.values) + (f" ({libvirt})" if libvirt else ""))
        if attr.pattern is not None and not re.fullmatch(attr.pattern, value):
            raise self.fail(node, f"<{node.tag} {name}='{value}'> must be {attr.what}")
        return value

    def yes_no(self, node: etree._Element, spec: Element, name: str) -> bool | None:
        """A two-valued attribute (yes|no, on|off): True for the first value."""
        value = self.value(node, spec, name)
        return None if value is None else value == spec.attr(name).values[0]

    def uint(self, node: etree._Element, spec: Element, name: str) -> int | None:
        value = self.value(node, spec, name)
        return None if value is None else int(value)


def parse_devices(doc: Document) -> Devices:
    """The model of a ``<ccidbridge>`` document (its root already checked)."""
    r = _Reader(doc)
    root = doc.root
    r.attrs(root, E["ccidbridge"])
    controllers: list[CcidController] = []
    smartcards: list[Smartcard] = []
    channels: list[SpiceChannel] = []
    for node in r.children(root, E["ccidbridge"]):
        if node.tag == "smartcard":
            smartcards.append(_smartcard(r, node))
        elif node.tag == "controller":
            controllers.append(_controller(r, node))
        else:
            channels.append(_channel(r, node))
    devices = Devices(tuple(controllers), tuple(smartcards), tuple(channels))
    _check_devices(r, devices)
    return devices


# ---------------------------------------------------------------------------- controllers


def _controller(r: _Reader, node: etree._Element) -> CcidController:
    """``<controller type='ccid' [index=N]>`` with an optional USB address.

    domaincommon.rng: ccid shares the "common attributes only" group (no model).
    """
    spec = E["controller"]
    r.attrs(node, spec)
    kind = node.get("type")
    if kind != "ccid":
        raise r.fail(node, f"<controller type='{kind}'> is not a ccidbridge device; allowed: "
                     "type='ccid' (the domain's own USB/PCI controllers stay in the domain)")
    index = r.uint(node, spec, "index")
    usb = None
    for child in r.children(node, spec):
        if usb is not None:
            raise r.fail(child, "a <controller> takes one <address>")
        usb = _usb_address(r, child)
    return CcidController(index=index, usb=usb, line=r.line(node))


def _usb_address(r: _Reader, node: etree._Element) -> UsbAddress:
    spec = E["controller/address"]
    r.leaf(node, spec)
    if node.get("type") != "usb":
        raise r.fail(node, f"a ccid controller's <address type='{node.get('type')}'> is not "
                     "valid; allowed: type='usb' bus='N' port='P' (it is a USB device)")
    bus = r.uint(node, spec, "bus")
    port = node.get("port")
    if bus is None or port is None:
        raise r.fail(node, "<address type='usb'> needs both bus='N' and port='P' (e.g. "
                     "bus='0' port='2'); leave the address out to let libvirt pick a port")
    port_attr = spec.attr("port")
    if not re.fullmatch(port_attr.pattern or "", port) or port.split(".")[0] == "0":
        raise r.fail(node, f"USB port='{port}' is not valid; allowed: {port_attr.what}")
    return UsbAddress(bus=bus, port=port)


# ----------------------------------------------------------------------------- smartcards


def _smartcard(r: _Reader, node: etree._Element) -> Smartcard:
    """One ``<smartcard>`` (formatdomain.rst "Smartcard devices")."""
    spec = E["smartcard"]
    line = r.line(node)
    mode = node.get("mode")
    if mode is None:
        raise r.fail(node, "<smartcard> needs mode='host|host-certificates|passthrough' "
                     "(libvirt: Missing required attribute 'mode' in element 'smartcard')")
    r.value(node, spec, "mode")
    if mode == "passthrough":
        return _passthrough(r, node)
    attrs, children = SMARTCARD_BY_MODE[mode]
    r.attrs(node, spec, attrs)
    address = None
    certificates: list[str] = []
    database = None
    for child in r.children(node, spec, children):
        if child.tag == "address":
            if address is not None:
                raise r.fail(child, "a <smartcard> takes one <address>")
            address = _ccid_address(r, child)
            continue
        if address is not None:
            raise r.fail(child, f"<{child.tag}> must come before <address> (libvirt schema "
                         "order: three <certificate>, optional <database>, optional <address>)")
        r.leaf(child, E[child.tag])
        text = child.text or ""
        if child.tag == "certificate":
            if database is not None:
                raise r.fail(child, "<certificate> after <database>: the libvirt schema wants "
                             "the three <certificate> elements first, then <database>")
            certificates.append(text)
        else:
            if database is not None:
                raise r.fail(child, "a <smartcard> takes at most one <database>")
            if not text.startswith("/"):
                raise r.fail(child, f"<database>{text}</database> must be an absolute "
                             f"directory path like /etc/pki/nssdb (libvirt: expecting "
                             f"absolute path: {text})")
            database = text
    if mode == "host-certificates" and len(certificates) != 3:
        raise r.fail(node, f"mode='host-certificates' needs exactly three <certificate> "
                     f"elements (NSS nicknames), found {len(certificates)} (libvirt: "
                     "host-certificates mode needs exactly three certificates)")
    return Smartcard(mode=mode, certificates=tuple(certificates), database=database,
                     address=address, line=line)


def _passthrough(r: _Reader, node: etree._Element) -> Smartcard:
    """``mode='passthrough'``: a chardev of any libvirt type, plus ccidbridge's ``<reader>``."""
    spec = E["smartcard"]
    attrs, children = SMARTCARD_BY_MODE["passthrough"]
    r.attrs(node, spec, attrs)
    kind = node.get("type")
    if kind is None:
        raise r.fail(node, "mode='passthrough' needs a character device type, e.g. "
                     "type='tcp' or type='unix'; allowed: " + "|".join(CHARDEV_TYPES)
                     + " (libvirt: passthrough mode requires a character device type "
                     "attribute)")
    if kind not in CHARDEV_TYPES:
        if kind in LIBVIRT_CHARDEV_TYPES:
            raise r.fail(node, f"type='{kind}' cannot carry a passthrough smartcard here; "
                         "allowed: " + "|".join(CHARDEV_TYPES))
        raise r.fail(node, f"type='{kind}' is not a character device type; allowed: "
                     + "|".join(CHARDEV_TYPES) + " (libvirt: unknown type presented to host "
                     f"for character device: {kind})")
    sources: list[CharSource] = []
    protocol = None
    log_file = log_append = None
    address = reader = None
    tls_node: etree._Element | None = None
    cleartext = False
    pin_guard: PinGuardSpec | None = None
    policy: ApduPolicy | None = None
    seen: set[str] = set()
    for child in r.children(node, spec, children):
        if child.tag in seen and child.tag != "source":
            raise r.fail(child, f"a <smartcard> takes at most one <{child.tag}>")
        seen.add(child.tag)
        if child.tag == "source":
            sources.append(_source(r, child, kind))
        elif child.tag == "protocol":
            r.leaf(child, E["protocol"])
            value = r.value(child, E["protocol"], "type")
            if kind == "tcp":  # libvirt parses it for tcp only and drops it otherwise
                protocol = value
        elif child.tag == "log":
            r.leaf(child, E["log"])
            log_file = child.get("file")
            if not log_file or not log_file.startswith("/"):
                raise r.fail(child, "<log> needs file='/absolute/path' (libvirt schema "
                             "absFilePath)")
            log_append = r.yes_no(child, E["log"], "append")
        elif child.tag == "address":
            address = _ccid_address(r, child)
        elif child.tag == "tls":
            tls_node = child
        elif child.tag == "cleartext":
            r.leaf(child, E["cleartext"])
            cleartext = r.yes_no(child, E["cleartext"], "network") is True
        elif child.tag == "pin-guard":
            r.leaf(child, E["pin-guard"])
            keep = r.uint(child, E["pin-guard"], "keep")
            assert keep is not None  # it has a default
            pin_guard = PinGuardSpec(keep=keep, line=r.line(child))
        elif child.tag == "policy":
            policy = _policy(r, child)
        else:
            reader = _reader(r, child)
    sources = _check_sources(r, node, kind, sources)
    tls_spec = _tls(r, tls_node, kind, sources) if tls_node is not None else None
    return Smartcard(
        mode="passthrough",
        chardev=Chardev(type=kind, sources=tuple(sources), protocol=protocol,
                        log_file=log_file, log_append=log_append),
        address=address, reader=reader, tls=tls_spec, cleartext_network=cleartext,
        pin_guard=pin_guard, policy=policy, line=r.line(node),
    )


def _tls(r: _Reader, node: etree._Element, kind: str, sources: list[CharSource]) -> TlsSpec:
    """ccidbridge's ``<tls dir=...>``: the bridge's side of a tls='yes' chardev.

    The files are loaded here, as the bridge will load them (ccidbridge/tls.py),
    so a missing or mismatched file is a config error at its line.
    """
    spec = E["tls"]
    r.leaf(node, spec)
    src = sources[0] if sources else None
    if kind != "tcp" or src is None or src.tls is not True:
        raise r.fail(node, "<tls> holds the bridge's certificates for a tcp chardev with "
                     "<source ... tls='yes'/>; this one does not use TLS")
    directory = node.get("dir")
    if not directory or not directory.startswith("/"):
        raise r.fail(node, "<tls> needs dir='/absolute/directory' (QEMU's layout: "
                     "ca-cert.pem, client-cert.pem + client-key.pem or server-cert.pem + "
                     "server-key.pem)")
    names = tuple((r.value(node, spec, "peer-names") or "").split())
    tls_spec = TlsSpec(dir=directory, peer_names=names, line=r.line(node))
    try:
        tls.context(tls_spec, listens=src.mode == "connect")
    except tls.TlsFilesError as exc:
        raise r.fail(node, f"<tls>: {exc}") from None
    return tls_spec


def _policy(r: _Reader, node: etree._Element) -> ApduPolicy:
    """ccidbridge's ``<policy>``: ``<allow>``/``<deny>`` rules in order (protocol/policy.py)."""
    spec = E["policy"]
    r.attrs(node, spec)
    rules = []
    for child in r.children(node, spec):
        rule_spec = E[child.tag]
        r.leaf(child, rule_spec)
        fields: dict[str, frozenset[int]] = {}
        for name in ("cla", "ins", "p1", "p2"):
            value = r.value(child, rule_spec, name)
            if value is not None:
                fields[name] = _byte_set(r, child, name, value)
        aid = r.value(child, rule_spec, "aid")
        written = " ".join(f"{k}='{v}'" for k, v in child.attrib.items())
        rules.append(PolicyRule(
            allow=child.tag == "allow", aid=bytes.fromhex(aid) if aid else None,
            text=f"<{child.tag}{' ' if written else ''}{written}/>", line=r.line(child),
            **fields,
        ))
    return ApduPolicy(rules=tuple(rules), line=r.line(node))


def _byte_set(r: _Reader, node: etree._Element, name: str, value: str) -> frozenset[int]:
    """The byte values ``47``, ``E0-EF`` (a range) and ``80/F0`` (value/mask) stand for."""
    out: set[int] = set()
    for item in value.split():
        low, sep, high = item[:2], item[2:3], item[3:]
        a = int(low, 16)
        if not sep:
            out.add(a)
        elif sep == "-":
            b = int(high, 16)
            if b < a:
                raise r.fail(node, f"<{node.tag} {name}='{value}'>: the range {item} is "
                             f"empty; write the lower byte first, e.g. '{high}-{low}'")
            out.update(range(a, b + 1))
        else:
            mask = int(high, 16)
            if a & ~mask:
                raise r.fail(node, f"<{node.tag} {name}='{value}'>: {item} matches nothing "
                             f"(the value has bits outside the mask); e.g. "
                             f"'{a & mask:02X}/{mask:02X}'")
            out.update(v for v in range(256) if v & mask == a)
    return frozenset(out)


def _source(r: _Reader, node: etree._Element, kind: str) -> CharSource:
    spec = E["source"]
    allowed = SOURCE_BY_TYPE.get(kind)
    if allowed is None:
        raise r.fail(node, f"type='{kind}' takes no <source>")
    r.attrs(node, spec, allowed)
    reconnect = None
    for child in r.children(node, spec, spec.children if kind in RECONNECT_TYPES else ()):
        reconnect = _reconnect(r, child)
    mode = r.value(node, spec, "mode")
    assert mode is not None  # it has a default
    if reconnect is not None and mode != "connect":
        raise r.fail(node, "<reconnect> needs <source mode='connect'> (QEMU dials out and "
                     "redials); a listening bind socket cannot reconnect (libvirt: chardev "
                     "reconnect is possible only for connect mode)")
    return CharSource(
        mode=mode,
        host=node.get("host"),
        service=node.get("service"),
        path=node.get("path"),
        channel=node.get("channel"),
        append=r.yes_no(node, spec, "append"),
        tls=r.yes_no(node, spec, "tls") if kind == "tcp" else None,
        reconnect=reconnect,
        line=r.line(node),
    )


def _reconnect(r: _Reader, node: etree._Element) -> Reconnect:
    spec = E["reconnect"]
    r.leaf(node, spec)
    enabled = r.yes_no(node, spec, "enabled")
    if enabled is None:
        raise r.fail(node, "<reconnect> needs enabled='yes|no'")
    timeout = r.uint(node, spec, "timeout")
    if enabled and timeout is None:
        raise r.fail(node, "<reconnect enabled='yes'> needs timeout='N' (seconds between "
                     "attempts; libvirt: Missing required attribute 'timeout' in element "
                     "'reconnect')")
    if enabled and timeout == 0:
        raise r.fail(node, "<reconnect timeout='0'> is not valid; allowed: 1 or more seconds "
                     "(libvirt: chardev reconnect source timeout cannot be '0')")
    return Reconnect(enabled=enabled, timeout=timeout)


def _check_sources(r: _Reader, node: etree._Element, kind: str,
                   sources: list[CharSource]) -> list[CharSource]:
    """Per-type source rules (virDomainChrSourceDefValidate and the parser).

    Returns the sources with ``port`` resolved from ``service``.
    """
    limit = 2 if kind == "udp" else 1
    if len(sources) > limit:
        wanted = "one <source>" if limit == 1 else "one bind and one connect <source>"
        raise r.fail(node, f"type='{kind}' takes {wanted} (libvirt: only one source element "
                     "is allowed for character device)")
    src = sources[0] if sources else None
    if kind in ("tcp", "udp"):
        if kind == "udp":
            modes = [s.mode for s in sources]
            if len(set(modes)) != len(modes):
                raise r.fail(node, "type='udp' takes at most one <source mode='bind'> and one "
                             "<source mode='connect'>")
            src = next((s for s in sources if s.mode == "connect"), None)
            if src is None:
                raise r.fail(node, "type='udp' needs <source mode='connect' host='H' "
                             "service='P'/> (where QEMU sends)")
        if src is None:
            raise r.fail(node, f"type='{kind}' needs <source mode='bind|connect' host='H' "
                         "service='PORT'/> (libvirt: Missing source host attribute for char "
                         "device)")
        for s in sources:
            if kind == "udp" and s.mode == "bind":
                required: tuple[str, ...] = ()
            else:
                required = ("host", "service")
            for attr in required:
                if not getattr(s, attr):
                    hint = ("an address, e.g. host='127.0.0.1'" if attr == "host"
                            else "a port 1-65535, e.g. service='2001'")
                    raise r.fail_at(s.line, f"<source> of type='{kind}' needs {attr}=: {hint} "
                                    f"(libvirt: Missing source {attr} attribute for char device)")
        sources = [replace(s, port=_port(r, s)) if s.service is not None else s
                   for s in sources]
    elif kind in ("unix", "file", "pipe", "dev"):
        if src is None or not src.path:
            raise r.fail(node, f"type='{kind}' needs <source path='/absolute/path'/> "
                         "(libvirt: Missing source path attribute for char device)")
        if not src.path.startswith("/"):
            raise r.fail(node, f"<source path='{src.path}'> must be absolute: QEMU and the "
                         "bridge would resolve a relative path against different directories")
        if kind == "unix" and len(os.fsencode(src.path)) > MAX_UNIX_PATH:
            raise r.fail_at(src.line, f"<source path='{src.path}'> is {len(os.fsencode(src.path))} "
                         f"bytes; a Unix socket path can have at most {MAX_UNIX_PATH} (the "
                         "kernel's sun_path): neither QEMU nor the bridge could use it")
    elif kind == "spiceport" and (src is None or not src.channel):
        raise r.fail(node, "type='spiceport' needs <source channel='org.example.name'/>")
    return sources


def _port(r: _Reader, src: CharSource) -> int:
    """A TCP/UDP service: a port number 1-65535 or a name from /etc/services."""
    service = src.service or ""
    if re.fullmatch("[0-9]+", service):
        port = int(service)
        if 1 <= port <= 65535:
            return port
    else:
        try:
            return socket.getservbyname(service)
        except OSError:
            pass
    raise r.fail_at(src.line, f"service='{service}' is not a port; allowed: 1-65535 or a service "
                 "name from /etc/services")


def _ccid_address(r: _Reader, node: etree._Element) -> CcidAddress:
    """``<address type='ccid' controller='C' [slot='S']/>`` (domaincommon.rng ccidaddress)."""
    spec = E["smartcard/address"]
    # bus= and port= too at first: a USB address here gets the message about its type.
    r.attrs(node, spec, (*spec.names, "bus", "port"))
    list(r.children(node, spec))
    if node.get("type") != "ccid":
        raise r.fail(node, f"a smartcard's <address type='{node.get('type')}'> is not valid; "
                     "allowed: type='ccid' controller='0' slot='0' (a card sits in a ccid "
                     "controller; give the controller its USB address instead; libvirt: "
                     "Controllers must use the 'ccid' address type)")
    r.attrs(node, spec)
    controller = r.uint(node, spec, "controller")
    if controller is None:
        raise r.fail(node, "<address type='ccid'> needs controller='N' (the libvirt schema "
                     "requires it)")
    slot = r.uint(node, spec, "slot")
    return CcidAddress(controller=controller, slot=slot)


def _reader(r: _Reader, node: etree._Element) -> ReaderSpec:
    """ccidbridge's ``<reader>``: which host PC/SC reader feeds this card."""
    spec = E["reader"]
    r.leaf(node, spec)
    name, match = node.get("name"), node.get("match")
    if name is not None and match is not None:
        raise r.fail(node, "<reader> takes name= (exact PC/SC name) or match= (a glob), "
                     "not both")
    if name == "" or match == "":
        raise r.fail(node, "<reader name=/match=> must not be empty; leave it out to use the "
                     "first reader with a card")
    atr = _hex(r, node, "atr")
    mask = _hex(r, node, "atr-mask")
    if mask is not None and (atr is None or len(mask) != len(atr)):
        raise r.fail(node, "atr-mask= needs atr= of the same length (one mask byte per ATR "
                     "byte)")
    share = Share(r.value(node, spec, "share"))
    protocol = CardProtocol(r.value(node, spec, "protocol"))
    rewrite = r.yes_no(node, spec, "rewrite-atr")
    assert rewrite is not None  # it has a default
    timeout = ReaderSpec.apdu_timeout
    if node.get("timeout") is not None:
        try:
            timeout = float(node.get("timeout", ""))
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise r.fail(node, f"<reader timeout='{node.get('timeout')}'> is not valid; "
                         f"allowed: {spec.attr('timeout').what}")
    keep = frozenset((r.value(node, spec, "keep") or "").split())
    assert keep <= {*PRESENTATION_RULES, "all"}  # the vocabulary's pattern names them
    return ReaderSpec(
        name=name, match=match, atr=atr, atr_mask=mask, share=share, protocol=protocol,
        rewrite_atr=rewrite, apdu_timeout=timeout, keep=keep, line=r.line(node),
    )


def _hex(r: _Reader, node: etree._Element, name: str) -> bytes | None:
    value = node.get(name)
    if value is None:
        return None
    digits = re.sub(r"[\s:]", "", value)
    if not digits or len(digits) % 2 or not _HEX.fullmatch(digits) or len(digits) > 66:
        raise r.fail(node, f"<reader {name}='{value}'> is not valid; allowed: 1-33 hex bytes, "
                     "optionally separated by spaces or colons, e.g. '3B 8F 80 01'")
    return bytes.fromhex(digits)


# ------------------------------------------------------------------------------- channels


def _channel(r: _Reader, node: etree._Element) -> SpiceChannel:
    """``<channel type='spicevmc'>`` with ``<target type='virtio'>`` (formatdomain "Channel")."""
    spec = E["channel"]
    r.attrs(node, spec)
    if node.get("type") != "spicevmc":
        raise r.fail(node, f"<channel type='{node.get('type')}'> is not a ccidbridge device; "
                     "allowed: type='spicevmc' (the SPICE agent channel)")
    target = address = None
    for child in r.children(node, spec):
        if child.tag == "target":
            r.leaf(child, E["target"])
            if child.get("type") is None:
                raise r.fail(child, "<target> needs type='virtio' (libvirt: target type must "
                             "be specified for channel device)")
            if child.get("type") != "virtio":
                raise r.fail(child, f"<target type='{child.get('type')}'> is not valid for a "
                             "spicevmc channel; allowed: type='virtio'")
            name = child.get("name")
            if name is not None and name != SPICE_AGENT_NAME:
                raise r.fail(child, f"<target name='{name}'> is not valid; allowed: "
                             f"name='{SPICE_AGENT_NAME}' or no name (libvirt: Unsupported "
                             f"spicevmc target name '{name}')")
            target = child
        else:
            address_spec = E["channel/address"]
            r.leaf(child, address_spec)
            if child.get("type") != "virtio-serial":
                raise r.fail(child, "a channel's <address> must be type='virtio-serial' "
                             "controller='0' bus='0' port='N'")
            controller = r.uint(child, address_spec, "controller") or 0
            bus = r.uint(child, address_spec, "bus") or 0
            port = r.uint(child, address_spec, "port")
            if port is None or port == 0:
                raise r.fail(child, "<address type='virtio-serial'> needs port='N' (1 or more)")
            address = VirtioSerialAddress(controller, bus, port)
    if target is None:
        raise r.fail(node, "<channel type='spicevmc'> needs <target type='virtio'/> (libvirt: "
                     "target type must be specified for channel device)")
    return SpiceChannel(target_name=target.get("name"), address=address, line=r.line(node))


# ----------------------------------------------------------------------- cross-device rules


def _check_devices(r: _Reader, devices: Devices) -> None:
    """Rules across devices (qemuValidateDomainSmartcardDef and address uniqueness)."""
    seen: dict[int, int] = {}
    for ctl in devices.controllers:
        if ctl.index is not None:
            if ctl.index in seen:
                raise r.fail_at(ctl.line, f"two <controller type='ccid' index='{ctl.index}'> "
                             f"(the other on line {seen[ctl.index]}); each index once")
            seen[ctl.index] = ctl.line
    ports: dict[tuple[int, str], int] = {}
    for ctl in devices.controllers:
        if ctl.usb is not None:
            key = (ctl.usb.bus, ctl.usb.port)
            if key in ports:
                raise r.fail_at(ctl.line, f"USB bus {key[0]} port {key[1]} is used twice "
                             f"(also on line {ports[key]})")
            ports[key] = ctl.line
    for i, card in enumerate(devices.smartcards):
        if i == 0:
            addr = card.address
            if addr is not None and (addr.controller != 0 or (addr.slot or 0) != 0):
                raise r.fail_at(card.line, f"<address type='ccid' controller='{addr.controller}' "
                             f"slot='{addr.slot}'> is not possible: QEMU's usb-ccid has one slot "
                             "and libvirt 9.0 takes only controller='0' slot='0' (libvirt: this "
                             "QEMU binary lacks multiple smartcard support); for more cards add "
                             "more <smartcard> elements without <address>")
            continue
        if card.address is not None:
            raise r.fail_at(card.line, "only the first <smartcard> may have an <address>: "
                         "libvirt 9.0 refuses a second smartcard (this QEMU binary lacks "
                         "multiple smartcard support), so ccidbridge gives each extra card "
                         "its own ccid controller and passes the card in <qemu:commandline>")
        if card.chardev is not None and card.chardev.type in ("spicevmc", "spiceport"):
            kind = card.chardev.type
            raise r.fail_at(card.line, f"an extra <smartcard> cannot be type='{kind}': SPICE "
                            "has one smartcard channel, and only the first <smartcard> is "
                            "libvirt's; use tcp or unix for the extra cards")
    endpoints: dict[tuple[str | None, ...], int] = {}
    for card in devices.smartcards:
        src = card.chardev.source if card.chardev else None
        if src is None or card.chardev is None or card.chardev.type not in ("tcp", "unix"):
            continue
        endpoint = (card.chardev.type, src.host, src.service, src.path)
        if endpoint in endpoints:
            where = src.path or f"{src.host}:{src.service}"
            raise r.fail_at(src.line, f"{where} is already the chardev of the <smartcard> on "
                            f"line {endpoints[endpoint]}; each card needs its own socket")
        endpoints[endpoint] = card.line
    vs_ports: dict[tuple[int, int, int], int] = {}
    for ch in devices.channels:
        if ch.address is not None:
            vs_port = (ch.address.controller, ch.address.bus, ch.address.port)
            if vs_port in vs_ports:
                raise r.fail_at(ch.line, f"virtio-serial port {vs_port[2]} is used twice (also "
                             f"on line {vs_ports[vs_port]})")
            vs_ports[vs_port] = ch.line
