"""Reading a config file into an lxml tree, safely.

DTDs are refused outright: no external entities, no entity expansion, no
network.  Not-XML, empty files and foreign root elements each get one line.
"""

from __future__ import annotations

import re

from lxml import etree

from ccidbridge.config.errors import ConfigError

ROOT = "ccidbridge"
_DTD = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
    )


def parse_bytes(data: bytes, path: str) -> etree._Element:
    """The root ``<ccidbridge>`` element of ``data``, or a ConfigError."""
    if not data.strip():
        raise ConfigError(path, 1, "the file is empty; expected a <ccidbridge> document")
    dtd = _DTD.search(data)
    if dtd:
        line = data.count(b"\n", 0, dtd.start()) + 1
        raise ConfigError(
            path, line,
            "DOCTYPE and ENTITY declarations are refused (no DTDs, external entities or "
            "entity expansion); write plain XML",
        )
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or 1
        message = exc.msg or "not well-formed"
        message = re.sub(r", line \d+, column \d+$", "", message)
        raise ConfigError(path, line, f"not well-formed XML: {message}") from None
    for node in root.iter():
        if isinstance(node, etree._Entity):
            raise ConfigError(
                path, node.sourceline, f"entity reference &{node.name}; refused; only the "
                "predefined &amp; &lt; &gt; &apos; &quot; and character references are allowed",
            )
    _start_lines(root, data)
    if root.tag != ROOT:
        hint = ""
        if root.tag == "domain":
            hint = (
                "; this is a libvirt domain: copy its <smartcard>, <controller type='ccid'> "
                "and <channel type='spicevmc'> elements into a <ccidbridge> element"
            )
        raise ConfigError(
            path, root.sourceline, f"the root element is <{root.tag}>, expected <{ROOT}>{hint}"
        )
    return root


def _start_lines(root: etree._Element, data: bytes) -> None:
    """Point each element's ``sourceline`` at its start tag's first line.

    libxml2 records the line where the start tag *ends*; a ``<reader>`` spread
    over three lines should be reported at its first.
    """
    ends: list[int] = [0]
    for line in data.split(b"\n"):
        ends.append(ends[-1] + len(line) + 1)
    for node in root.iter():
        if not isinstance(node.tag, str) or "{" in node.tag or node.sourceline is None:
            continue
        end = ends[min(node.sourceline, len(ends) - 1)]
        start = data.rfind(b"<" + node.tag.encode(), 0, end)
        if start >= 0:
            node.sourceline = data.count(b"\n", 0, start) + 1


def read(path: str) -> etree._Element:
    """Read and parse ``path`` (see ``parse_bytes``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the config: {exc.strerror}") from None
    return parse_bytes(data, path)
