"""The RelaxNG schema shipped with the package (``schema.rng``), for other tools.

An artefact, not a check on the user's path: ``load`` checks a config against
vocabulary.py alone.  tests/test_config_schema.py keeps schema.rng equal to
that vocabulary and in agreement with libvirt's own virt-xml-validate, so an
editor or CI can validate configs with it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from lxml import etree


@cache
def schema() -> etree.RelaxNG:
    text = resources.files("ccidbridge.config").joinpath("schema.rng").read_bytes()
    return etree.RelaxNG(etree.fromstring(text))
