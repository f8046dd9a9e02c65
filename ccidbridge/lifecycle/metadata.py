"""The ``<metadata>`` element that ties a libvirt domain to a ccidbridge config.

``ccidbridge libvirt CONFIG --metadata PATH`` prints it; the libvirt hook
(:mod:`ccidbridge.lifecycle.hook`) reads it from the domain XML libvirt passes
on stdin and starts the bridge for ``PATH``.  libvirt keeps foreign elements
in ``<metadata>`` as long as they carry their own namespace (formatdomain
"General metadata"; docs/lifecycle.md#H3).
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from lxml import etree

NS = "urn:ccidbridge:domain:1"
PREFIX = "ccidbridge"
ELEMENT = "bridge"


def render(config_path: str) -> str:
    """The element for the domain's ``<metadata>``."""
    value = escape(config_path, {"'": "&apos;", '"': "&quot;"})
    return f"<{PREFIX}:{ELEMENT} xmlns:{PREFIX}='{NS}' config='{value}'/>"


def config_of(domain_xml: bytes) -> str | None:
    """The config path a domain's XML names, or None (no element, or not XML).

    The XML comes from libvirt, but it is parsed as carefully as a config:
    no DTD, no entities, no network.
    """
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    try:
        root = etree.fromstring(domain_xml, parser)
    except etree.XMLSyntaxError:
        return None
    found = root.find(f"metadata/{{{NS}}}{ELEMENT}")
    if found is None:
        return None
    return found.get("config") or None
