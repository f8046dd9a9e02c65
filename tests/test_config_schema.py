"""The shipped RelaxNG schema states the vocabulary, and agrees with libvirt 9.0's own.

schema.rng is an artefact for other tools (ccidbridge itself checks configs
against config/vocabulary.py alone): here it must name exactly the elements,
attributes, enumerated values and patterns the vocabulary does, and accept and
refuse what libvirt's virt-xml-validate accepts and refuses.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from lxml import etree

from ccidbridge.config.schema import schema
from ccidbridge.config.vocabulary import ELEMENTS, Element
from lab.examples_regen import configs
from tests.fixtures_libvirt import config_devices, wrap
from tests.fixtures_stack import missing

GOOD = [
    "<smartcard mode='host'/>",
    "<smartcard mode='host'><address type='ccid' controller='0' slot='0'/></smartcard>",
    "<smartcard mode='passthrough' type='tcp'><source mode='bind' host='h' service='1' "
    "tls='no'><reconnect enabled='no'/></source><protocol type='telnets'/>"
    "<log file='/tmp/l' append='off'/></smartcard>",
    "<controller type='ccid' index='3'><address type='usb' bus='0' port='1.2'/></controller>",
    "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/><address "
    "type='virtio-serial' controller='0' bus='0' port='2'/></channel>",
]
# What virt-xml-validate (libvirt 9.0) rejects (docs/libvirt-facts.md#L2).
BAD = [
    "<smartcard mode='bogus'/>",
    "<smartcard/>",
    "<smartcard mode='passthrough'/>",
    "<smartcard mode='passthrough' type='bogus'/>",
    "<smartcard mode='host-certificates'><certificate>a</certificate><certificate>b"
    "</certificate></smartcard>",
    "<smartcard mode='host-certificates'><certificate>a</certificate><certificate>b"
    "</certificate><certificate>c</certificate><certificate>d</certificate></smartcard>",
    "<smartcard mode='host-certificates'><certificate>a</certificate><certificate>b"
    "</certificate><certificate>c</certificate><database>rel</database></smartcard>",
    "<smartcard mode='host-certificates'><database>/d</database><certificate>a</certificate>"
    "<certificate>b</certificate><certificate>c</certificate></smartcard>",
    "<smartcard mode='host'><certificate>a</certificate></smartcard>",
    "<smartcard mode='passthrough' type='tcp'><protocol type='bogus'/></smartcard>",
    "<smartcard mode='passthrough' type='tcp'><source tls='on'/></smartcard>",
    "<smartcard mode='host'><address type='ccid' controller='100'/></smartcard>",
    "<smartcard mode='host'><address type='ccid' controller='0' slot='a'/></smartcard>",
    "<smartcard mode='host'><address type='ccid' slot='0'/></smartcard>",
    "<smartcard mode='host'><alias name='ua-sc0'/></smartcard>",
    "<controller type='ccid' model='foo'/>",
]


def _ours(devices: str) -> bool:
    return schema().validate(etree.fromstring(f"<ccidbridge>{devices}</ccidbridge>"))


def _libvirts(tmp_path: Path, devices: str) -> bool:
    domain = tmp_path / "d.xml"
    domain.write_text(wrap(devices))
    rc = subprocess.run(["virt-xml-validate", str(domain), "domain"],
                        capture_output=True).returncode
    assert rc in (0, 3), rc
    return rc == 0


@pytest.mark.parametrize("example", configs(), ids=lambda p: p.stem)
def test_examples_validate(example: Path) -> None:
    assert schema().validate(etree.parse(str(example))), schema().error_log


@pytest.mark.parametrize(("devices", "valid"), [(d, True) for d in GOOD]
                         + [(d, False) for d in BAD])
def test_schema_agrees_with_virt_xml_validate(tmp_path: Path, devices: str, valid: bool) -> None:
    assert _ours(devices) is valid
    if shutil.which("virt-xml-validate") is None:
        missing("virt-xml-validate not installed (libvirt-clients)")
    assert _libvirts(tmp_path, devices) is valid


def test_reader_is_ours_only(tmp_path: Path) -> None:
    text = (configs()[0].parent / "tcp-bind.xml").read_text()
    assert "<reader" in text and "<reader" not in config_devices(text)
    assert _ours("<smartcard mode='passthrough' type='tcp'><reader name='x' share='shared' "
                 "protocol='T0' rewrite-atr='no' timeout='1.5' atr='3B 00' "
                 "atr-mask='FF:FF'/></smartcard>")
    assert not _ours("<smartcard mode='passthrough' type='tcp'><reader share='maybe'/>"
                     "</smartcard>")


# ------------------------------------------------------------------ schema.rng == vocabulary

RNG = "{http://relaxng.org/ns/structure/1.0}"
#: An <address> is told apart by its type: which vocabulary entry each one is.
ADDRESS_BY_TYPE = {"ccid": "smartcard/address", "usb": "controller/address",
                   "virtio-serial": "channel/address"}


def _rng_text() -> bytes:
    return resources.files("ccidbridge.config").joinpath("schema.rng").read_bytes()


class _Walk:
    """What a RelaxNG grammar says about each element: attributes, values, patterns, children."""

    def __init__(self, text: bytes) -> None:
        self.grammar = etree.fromstring(text)
        self.defines = {d.get("name"): d for d in self.grammar.iter(f"{RNG}define")}

    def _inside(self, node: etree._Element, stop: str) -> list[etree._Element]:
        """Descendants of ``node`` (refs followed), not descending into ``stop`` elements."""
        out: list[etree._Element] = []
        for child in node:
            if not isinstance(child.tag, str):
                continue
            out.append(child)
            if child.tag == f"{RNG}ref":
                out += self._inside(self.defines[child.get("name")], stop)
            elif child.tag not in (stop, f"{RNG}element", f"{RNG}attribute"):
                out += self._inside(child, stop)
        return out

    def attribute(self, node: etree._Element) -> tuple[set[str], set[str]]:
        """The <value>s and pattern params of one <attribute>."""
        found = self._inside(node, f"{RNG}element")
        values = {v.text or "" for v in found if v.tag == f"{RNG}value"}
        patterns = {p.text or "" for p in found
                    if p.tag == f"{RNG}param" and p.get("name") == "pattern"}
        return values, patterns

    def elements(self) -> dict[str, Element]:
        """Each <element> of the grammar, as the vocabulary would state it."""
        out: dict[str, Element] = {}
        for node in self.grammar.iter(f"{RNG}element"):
            found = self._inside(node, f"{RNG}element")
            attrs: dict[str, tuple[set[str], set[str]]] = {}
            for a in found:  # one name may appear in several branches (smartcard mode=)
                if a.tag == f"{RNG}attribute":
                    values, patterns = attrs.setdefault(a.get("name"), (set(), set()))
                    more_values, more_patterns = self.attribute(a)
                    values |= more_values
                    patterns |= more_patterns
            children = tuple(sorted({e.get("name") for e in found if e.tag == f"{RNG}element"}))
            tag = node.get("name")
            key = tag
            if tag == "address":
                (kind,) = attrs["type"][0]
                key = ADDRESS_BY_TYPE[kind]
            assert key not in out, f"two <element name='{tag}'> for {key}"
            out[key] = Element(tag, children=children, attrs=tuple(
                _Attr(name, values, patterns) for name, (values, patterns) in attrs.items()))
        return out


class _Attr:  # the schema's view of one attribute, duck-typed like vocabulary.Attr
    def __init__(self, name: str, values: set[str], patterns: set[str]) -> None:
        self.name, self.values, self.patterns = name, values, patterns


def differences(rng: bytes) -> list[str]:
    """Every way the grammar ``rng`` and the vocabulary disagree (empty: they agree)."""
    ours = _Walk(rng).elements()
    out = [f"{k}: in the vocabulary, not in schema.rng" for k in ELEMENTS if k not in ours]
    out += [f"{k}: in schema.rng, not in the vocabulary" for k in ours if k not in ELEMENTS]
    for key in ELEMENTS.keys() & ours.keys():
        voc, rng_el = ELEMENTS[key], ours[key]
        if tuple(sorted(voc.children)) != rng_el.children:
            out.append(f"{key}: children {sorted(voc.children)} vs {list(rng_el.children)}")
        if set(voc.names) != set(rng_el.names):
            out.append(f"{key}: attributes {sorted(voc.names)} vs {sorted(rng_el.names)}")
            continue
        for attr in voc.attrs:
            theirs = rng_el.attr(attr.name)
            assert isinstance(theirs, _Attr)
            if attr.kind == "enum" and set(attr.values) != theirs.values:
                out.append(f"{key} {attr.name}=: values {sorted(attr.values)} vs "
                           f"{sorted(theirs.values)}")
            if attr.kind != "enum" and theirs.values:
                out.append(f"{key} {attr.name}=: free in the vocabulary, enumerated in schema.rng")
            if attr.pattern is not None and theirs.patterns and {attr.pattern} != theirs.patterns:
                out.append(f"{key} {attr.name}=: pattern {attr.pattern} vs {theirs.patterns}")
    return out


def test_schema_states_the_vocabulary() -> None:
    assert differences(_rng_text()) == []


@pytest.mark.parametrize(("edit", "found"), [
    ((b"<value>T1</value>", b""), "reader protocol=: values"),
    ((b'<optional><attribute name="match"><text/></attribute></optional>', b""),
     "reader: attributes"),
    ((b"[0-9]{1,2}", b"[0-9]{1,3}"), "pattern"),
    ((b'<element name="log">', b'<element name="logfile">'), "log: in the vocabulary"),
])
def test_schema_check_catches_a_drift(edit: tuple[bytes, bytes], found: str) -> None:
    old, new = edit
    assert old in _rng_text()
    drifted = differences(_rng_text().replace(old, new, 1))
    assert any(found in d for d in drifted), drifted
