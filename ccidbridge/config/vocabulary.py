"""The config vocabulary, stated once: elements, attributes, allowed values, libvirt's words.

The parser (``parse.py``) checks every element against its entry here and
takes its messages from it; the shipped ``schema.rng`` is checked against this
table in tests/test_config_schema.py (and against libvirt's own
virt-xml-validate), never on the user's path.  The libvirt part follows
libvirt 9.0's domaincommon.rng and parser (docs/libvirt-facts.md#L1); ``<reader>``
``<tls>``, ``<cleartext>``, ``<pin-guard>`` and ``<policy>`` are ccidbridge's own.

To add an attribute: add an ``Attr`` to its element's ``attrs`` below (kind,
values or pattern, default, the libvirt message if libvirt has one); read it in
parse.py with ``r.value(node, ELEMENT, "name")`` (or ``r.uint``/``r.yes_no``)
into a model field; add the same attribute to schema.rng.  The schema test
fails until schema.rng and this table agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.spec import CardProtocol, Share

YES_NO = ("yes", "no")
#: <reader keep=...>: presentation rules to leave off (protocol/presentation.py RULES).
_RULE = "(ext-length|max-length|le|all)"
KEEP_PATTERN = rf"{_RULE}(\s+{_RULE})*"
ON_OFF = ("on", "off")


@dataclass(frozen=True)
class Attr:
    """One attribute: what values it takes and how a bad one is reported.

    ``kind``: ``enum`` (one of ``values``), ``uint`` (digits matching
    ``pattern``), ``text`` (any string matching ``pattern`` when one is set),
    ``hex`` (ATR bytes) or ``seconds`` (a positive decimal).
    """

    name: str
    kind: str = "text"
    values: tuple[str, ...] = ()
    pattern: str | None = None  # a regular expression the whole value must match
    what: str = ""  # the allowed values in words, for the message ("0-99")
    default: str | None = None
    libvirt: str = ""  # libvirt 9.0's own message for a bad value; {value} is replaced


@dataclass(frozen=True)
class Element:
    """One element in one place: its attributes and the children it may hold."""

    tag: str
    attrs: tuple[Attr, ...] = ()
    children: tuple[str, ...] = ()
    text: bool = False  # holds character data (an NSS nickname, a path)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attrs)

    def attr(self, name: str) -> Attr:
        return next(a for a in self.attrs if a.name == name)


def _mode(element: str) -> str:
    return f"libvirt: Invalid value for attribute 'mode' in element '{element}': '{{value}}'"


UINT = "[0-9]+"
CCID_NUMBER = "[0-9]{1,2}"  # domaincommon.rng ccidaddress
USB_PORT = r"[0-9]{1,3}(\.[0-9]{1,3}){0,4}"  # domaincommon.rng usbPort
ABSOLUTE = "/.*"  # domaincommon.rng absFilePath / absDirPath

# <allow>/<deny> header bytes: hex values, ranges (E0-EF) and value/mask pairs (80/F0).
BYTE_ITEM = "[0-9A-Fa-f]{2}([-/][0-9A-Fa-f]{2})?"
BYTE_SET = rf"{BYTE_ITEM}(\s+{BYTE_ITEM})*"
BYTE_SET_WHAT = ("hex bytes, ranges or value/mask pairs separated by spaces, e.g. "
                 "'47', 'DA DB', 'E0-EF' or '80/F0'")
RULE_ATTRS = (
    *(Attr(name, "text", pattern=BYTE_SET, what=BYTE_SET_WHAT)
      for name in ("cla", "ins", "p1", "p2")),
    Attr("aid", "text", pattern="([0-9A-Fa-f]{2}){1,16}",
         what="an application identifier (prefix) of 1-16 hex bytes, e.g. 'D27600012401'"),
)

SMARTCARD_MODES = ("host", "host-certificates", "passthrough")
TCP_PROTOCOLS = ("raw", "telnet", "telnets", "tls")
SPICE_AGENT_NAME = "com.redhat.spice.0"  # the only spicevmc channel target name QEMU takes
# libvirt 9.0 qemucdevSrcTypeChoice: every chardev type the domain schema accepts.
LIBVIRT_CHARDEV_TYPES = (
    "dev", "file", "pipe", "unix", "tcp", "udp", "null", "stdio", "vc", "pty",
    "spicevmc", "spiceport", "nmdm", "qemu-vdagent", "dbus",
)
# The ones ccidbridge renders (nmdm is FreeBSD-only; qemu-vdagent and dbus carry no VSCard).
CHARDEV_TYPES = (
    "tcp", "unix", "udp", "pty", "file", "pipe", "dev", "null", "vc", "stdio",
    "spicevmc", "spiceport",
)

# Every element, keyed by where it appears ("parent/tag" where the tag alone is ambiguous).
ELEMENTS: dict[str, Element] = {k: e for k, e in (
    ("ccidbridge", Element("ccidbridge", children=("smartcard", "controller", "channel"))),
    ("controller", Element("controller", (
        Attr("type", "enum", ("ccid",)),
        Attr("index", "uint", pattern=UINT, what="an unsigned integer"),
    ), children=("address",))),
    ("controller/address", Element("address", (
        Attr("type", "enum", ("usb",)),
        Attr("bus", "uint", pattern=UINT, what="an unsigned integer"),
        Attr("port", "text", pattern=USB_PORT, what="1-999, or a hub path like '1.2'"),
    ))),
    ("smartcard", Element("smartcard", (
        Attr("mode", "enum", SMARTCARD_MODES, libvirt=_mode("smartcard")),
        Attr("type", "enum", CHARDEV_TYPES,
             libvirt="libvirt: unknown type presented to host for character device: {value}"),
    ), children=("certificate", "database", "source", "protocol", "log", "reader",
                 "tls", "cleartext", "pin-guard", "policy", "address"))),
    ("certificate", Element("certificate", text=True)),
    ("database", Element("database", text=True)),
    ("source", Element("source", (
        Attr("mode", "enum", ("bind", "connect"), default="connect", libvirt=_mode("source")),
        Attr("host"),
        Attr("service"),
        Attr("path"),
        Attr("channel"),
        Attr("append", "enum", ON_OFF),
        Attr("tls", "enum", YES_NO),
    ), children=("reconnect",))),
    ("reconnect", Element("reconnect", (
        Attr("enabled", "enum", YES_NO),
        Attr("timeout", "uint", pattern=UINT, what="a whole number of seconds"),
    ))),
    ("protocol", Element("protocol", (
        Attr("type", "enum", TCP_PROTOCOLS, libvirt="libvirt: Unknown protocol '{value}'"),
    ))),
    ("log", Element("log", (
        Attr("file", "text", pattern=ABSOLUTE, what="an absolute path"),
        Attr("append", "enum", ON_OFF),
    ))),
    ("smartcard/address", Element("address", (
        Attr("type", "enum", ("ccid",)),
        Attr("controller", "uint", pattern=CCID_NUMBER, what="0-99"),
        Attr("slot", "uint", pattern=CCID_NUMBER, what="0-99"),
    ))),
    ("reader", Element("reader", (
        Attr("name"),
        Attr("match"),
        Attr("atr", "hex"),
        Attr("atr-mask", "hex"),
        Attr("share", "enum", tuple(s.value for s in Share), default=Share.EXCLUSIVE.value),
        Attr("protocol", "enum", tuple(p.value for p in CardProtocol),
             default=CardProtocol.ANY.value),
        Attr("rewrite-atr", "enum", YES_NO, default="yes"),
        Attr("timeout", "seconds", what="seconds > 0, e.g. timeout='30'"),
        Attr("keep", "text", pattern=KEEP_PATTERN,
             what="a space-separated list of ext-length|max-length|le|all, e.g. 'le'"),
    ))),
    ("tls", Element("tls", (
        Attr("dir", "text", pattern=ABSOLUTE, what="an absolute directory"),
        Attr("peer-names", "text", pattern=r"\S+(\s+\S+)*",
             what="names separated by spaces, e.g. 'qemu.example.org'"),
    ))),
    ("cleartext", Element("cleartext", (
        Attr("network", "enum", YES_NO, default="no"),
    ))),
    ("pin-guard", Element("pin-guard", (
        Attr("keep", "uint", pattern="[0-9]|1[0-5]", what="0-15 tries (0 switches the guard off)",
             default="1"),
    ))),
    ("policy", Element("policy", children=("allow", "deny"))),
    ("allow", Element("allow", RULE_ATTRS)),
    ("deny", Element("deny", RULE_ATTRS)),
    ("channel", Element("channel", (
        Attr("type", "enum", ("spicevmc",)),
    ), children=("target", "address"))),
    ("target", Element("target", (
        Attr("type", "enum", ("virtio",)),
        Attr("name", "enum", (SPICE_AGENT_NAME,),
             libvirt="libvirt: Unsupported spicevmc target name '{value}'"),
    ))),
    ("channel/address", Element("address", (
        Attr("type", "enum", ("virtio-serial",)),
        Attr("controller", "uint", pattern=UINT, what="an unsigned integer"),
        Attr("bus", "uint", pattern=UINT, what="an unsigned integer"),
        Attr("port", "uint", pattern=UINT, what="an unsigned integer"),
    ))),
)}

# Which attributes and children each smartcard mode takes (domaincommon.rng "smartcard").
SMARTCARD_BY_MODE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "host": (("mode",), ("address",)),
    "host-certificates": (("mode",), ("certificate", "database", "address")),
    "passthrough": (("mode", "type"),
                    ("source", "protocol", "log", "address", "reader", "tls", "cleartext",
                     "pin-guard", "policy")),
}
# Which <source> attributes each chardev type reads (domain_conf.c virDomainChrSourceDefParseXML).
SOURCE_BY_TYPE: dict[str, tuple[str, ...]] = {
    "tcp": ("mode", "host", "service", "tls"),
    "unix": ("mode", "path"),
    "udp": ("mode", "host", "service"),
    "file": ("path", "append"),
    "pipe": ("path",),
    "dev": ("path",),
    "spiceport": ("channel",),
}
# The chardev types whose <source> may hold a <reconnect> (libvirt: socket chardevs only).
RECONNECT_TYPES = ("tcp", "unix")
