"""The RelaxNG schema shipped with the package (``schema.rng``), as a backstop.

The semantic checks in ``parse`` run first and give the precise messages; the
schema then guarantees the structure matches libvirt's domaincommon.rng for
these devices (plus ``<reader>``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from lxml import etree

from ccidbridge.config.errors import ConfigError


@cache
def schema() -> etree.RelaxNG:
    text = resources.files("ccidbridge.config").joinpath("schema.rng").read_bytes()
    return etree.RelaxNG(etree.fromstring(text))


def validate(root: etree._Element, path: str) -> None:
    rng = schema()
    if rng.validate(root):
        return
    entry = rng.error_log.last_error
    line = entry.line if entry is not None else root.sourceline
    message = entry.message if entry is not None else "does not match the schema"
    raise ConfigError(
        path, line, f"{message} (allowed: see ccidbridge/config/schema.rng, which follows "
        "libvirt 9.0's domaincommon.rng for <smartcard>, <controller type='ccid'> and "
        "<channel type='spicevmc'>, plus ccidbridge's <reader>)",
    )
