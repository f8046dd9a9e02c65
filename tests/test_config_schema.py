"""The shipped RelaxNG schema agrees with libvirt 9.0's own (virt-xml-validate)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from ccidbridge.config.schema import schema
from lab.examples_regen import configs
from tests.fixtures_libvirt import config_devices, wrap

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
# libvirt.md §5a: what virt-xml-validate (9.0) rejects.
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
    if shutil.which("virt-xml-validate"):
        assert _libvirts(tmp_path, devices) is valid


def test_reader_is_ours_only(tmp_path: Path) -> None:
    text = (configs()[0].parent / "tcp-bind.xml").read_text()
    assert "<reader" in text and "<reader" not in config_devices(text)
    assert _ours("<smartcard mode='passthrough' type='tcp'><reader name='x' share='shared' "
                 "protocol='T0' rewrite-atr='no' timeout='1.5' atr='3B 00' "
                 "atr-mask='FF:FF'/></smartcard>")
    assert not _ours("<smartcard mode='passthrough' type='tcp'><reader share='maybe'/>"
                     "</smartcard>")
