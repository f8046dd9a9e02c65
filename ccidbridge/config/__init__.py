"""ccidbridge's config: XML in libvirt's vocabulary plus ccidbridge's ``<reader>``.

``load(path)`` reads (bounded: document.py), checks against the vocabulary
and libvirt 9.0's rules (vocabulary.py, parse.py), lays the devices out as
libvirt would (layout.py) and returns a frozen ``Config``; any problem raises
``ConfigError`` whose ``str()`` is ``FILE:LINE: message`` (or ``FILE: message``).
"""

from __future__ import annotations

from ccidbridge.config.document import Document, parse_bytes, read
from ccidbridge.config.errors import ConfigError
from ccidbridge.config.layout import layout
from ccidbridge.config.loaded import Config
from ccidbridge.config.parse import parse_devices
from ccidbridge.config.serving import refusals, served_cards, unserved

__all__ = ["Config", "ConfigError", "load", "loads"]


def _config(doc: Document) -> Config:
    devices = parse_devices(doc)
    lay = layout(devices)
    return Config(path=doc.path, devices=devices, layout=lay,
                  cards=served_cards(doc.path, lay), skipped=unserved(doc.path, lay),
                  refused=refusals(doc.path, lay))


def loads(data: bytes | str, path: str = "<config>") -> Config:
    """A Config from the text of a config file (``path`` only names it in messages)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _config(parse_bytes(data, path))


def load(path: str) -> Config:
    """Read and check the config at ``path``; raises ConfigError."""
    return _config(read(path))
