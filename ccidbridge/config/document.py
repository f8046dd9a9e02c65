"""Reading a config file into an lxml tree, bounded and in linear time.

Every input ends in a tree or in one ``ConfigError`` line: only regular files
are opened (a FIFO would block, ``/dev/zero`` never ends, a directory is no
file), at most ``MAX_BYTES`` are read, and DTDs are refused outright (no
external entities, no entity expansion, no network).  libxml2's own depth
limit (256) stands.  Element lines come from :meth:`Document.line`, looked up
once per element from a table of line offsets built in one pass.
"""

from __future__ import annotations

import bisect
import os
import re
import stat
from dataclasses import dataclass, field

from lxml import etree

from ccidbridge.config.errors import ConfigError

ROOT = "ccidbridge"
#: The largest config read, in bytes (a real one is a few hundred).
MAX_BYTES = 1 << 20
# Whatever may precede a DOCTYPE in the prolog: XML declaration, PIs, comments, space.
_PROLOG_ITEM = re.compile(rb"\s+|<\?.*?\?>|<!--.*?-->", re.DOTALL)
_FILE_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)",
               stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
               stat.S_ISSOCK: "a socket"}


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
    )


@dataclass
class Document:
    """A parsed config: its root element and where each element starts."""

    path: str
    root: etree._Element
    data: bytes
    _line_ends: list[int] = field(default_factory=list, repr=False)
    _lines: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._line_ends = [m.start() for m in re.finditer(rb"\n", self.data)]

    def line(self, node: etree._Element) -> int:
        """The line ``node``'s start tag begins on.

        libxml2 records the line where the start tag *ends* (a ``<reader>``
        spread over three lines is reported at its last); the start is the
        nearest ``<tag`` before the end of that line.  Memoized per (tag,
        line), so a file with many elements on one line stays linear.  Kept
        here, not in ``sourceline``, which lxml stores in 16 bits.
        """
        end_line = node.sourceline or 1
        tag = node.tag if isinstance(node.tag, str) else ""
        key = (tag, end_line)
        if key not in self._lines:
            end = (self._line_ends[end_line - 1] if end_line <= len(self._line_ends)
                   else len(self.data))
            start = self.data.rfind(b"<" + tag.encode(), 0, end) if tag else -1
            self._lines[key] = (bisect.bisect_left(self._line_ends, start) + 1
                                if start >= 0 else end_line)
        return self._lines[key]


def _syntax_message(exc: etree.XMLSyntaxError) -> str:
    message = exc.msg or "not well-formed"
    message = re.sub(r",\s*line \d+, column \d+\s*$", "", message)
    return " ".join(message.split())


def _doctype_line(data: bytes) -> int:
    """The line of the DOCTYPE in the prolog (after any comments and PIs), else 1."""
    pos = 0
    while (item := _PROLOG_ITEM.match(data, pos)) and item.end() > pos:
        pos = item.end()
    return data.count(b"\n", 0, pos) + 1 if data.startswith(b"<!DOCTYPE", pos) else 1


def parse_bytes(data: bytes, path: str) -> Document:
    """The ``<ccidbridge>`` document in ``data``, or a ConfigError."""
    if len(data) > MAX_BYTES:
        raise ConfigError(path, None, f"the file is {len(data)} bytes, more than a config can "
                          f"be ({MAX_BYTES} bytes at most)")
    if not data.strip():
        raise ConfigError(path, 1, "the file is empty; expected a <ccidbridge> document")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise ConfigError(path, exc.lineno or 1,
                          f"not well-formed XML: {_syntax_message(exc)}") from None
    except (ValueError, UnicodeError, LookupError) as exc:  # e.g. an unknown encoding=
        raise ConfigError(path, 1, f"not readable as XML: {exc}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise ConfigError(
            path, _doctype_line(data),
            "DOCTYPE and ENTITY declarations are refused (no DTDs, external entities or "
            "entity expansion); write plain XML",
        )
    doc = Document(path, root, data)
    if root.tag != ROOT:
        hint = ""
        if root.tag == "domain":
            hint = (
                "; this is a libvirt domain: copy its <smartcard>, <controller type='ccid'> "
                "and <channel type='spicevmc'> elements into a <ccidbridge> element"
            )
        raise ConfigError(
            path, doc.line(root), f"the root element is <{root.tag}>, expected <{ROOT}>{hint}"
        )
    return doc


def read(path: str) -> Document:
    """Read and parse the regular file ``path`` (see ``parse_bytes``)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the config: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((what for test, what in _FILE_KINDS.items() if test(mode)),
                        "not a regular file")
            raise ConfigError(path, None, f"cannot read the config: it is {kind}, not a "
                              "regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the config: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_BYTES:
        raise ConfigError(path, None, f"the file is larger than a config can be ({MAX_BYTES} "
                          "bytes at most)")
    return parse_bytes(data, path)
