"""ccidbridge's config: XML in libvirt's vocabulary plus ccidbridge's ``<reader>``.

``load(path)`` reads, validates (semantic checks mirroring libvirt 9.0, then the
RelaxNG schema shipped as ``schema.rng``) and returns a frozen ``Config``; any
problem raises ``ConfigError`` whose ``str()`` is ``FILE:LINE: message``.
"""

from __future__ import annotations

from ccidbridge.config.document import parse_bytes, read
from ccidbridge.config.errors import ConfigError
from ccidbridge.config.model import Config
from ccidbridge.config.parse import parse_devices
from ccidbridge.config.schema import validate

__all__ = ["Config", "ConfigError", "load", "loads"]


def loads(data: bytes | str, path: str = "<config>") -> Config:
    """A Config from the text of a config file (``path`` only names it in messages)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    root = parse_bytes(data, path)
    devices = parse_devices(root, path)
    validate(root, path)
    return Config(path=path, devices=devices)


def load(path: str) -> Config:
    """Read and validate the config at ``path``; raises ConfigError."""
    root = read(path)
    devices = parse_devices(root, path)
    validate(root, path)
    return Config(path=path, devices=devices)
