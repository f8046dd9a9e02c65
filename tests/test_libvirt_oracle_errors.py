"""The real libvirt (9.0, 11.3 and 12.8) rejects every config of test_config_errors.py's
ERRORS table with the message the table (and ccidbridge's own message) quotes."""

from __future__ import annotations

import pytest

from tests.fixtures_libvirt import wrap
from tests.test_config_errors import ERRORS

pytestmark = pytest.mark.libvirt
SPICE = "<graphics type='spice'/>"
#: Where libvirt 11.3 and 12.8 word a refusal differently from 9.0 (whose wording the
#: ERRORS table and ccidbridge's own message quote): docs/libvirt-facts.md#L32.
NEWER_WORDING = {
    "bad-protocol": "Invalid value for attribute 'type' in element 'protocol': 'bogus'",
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_libvirt_rejects(libvirtd, case: str) -> None:
    devices, libvirt_message, _ = ERRORS[case]
    if not libvirtd.stack.is_host:
        libvirt_message = NEWER_WORDING.get(case, libvirt_message)
    domain = wrap(devices + (SPICE if "spicevmc" in devices else ""))
    defined = libvirtd.define_dumpxml(domain, "ccidbridge-oracle")
    native = libvirtd.domxml_to_native(domain)
    assert defined.returncode != 0 or native.returncode != 0
    assert libvirt_message in defined.stderr + native.stderr


def test_usb_disabled(libvirtd) -> None:
    """The domain-level error check can only warn about (it never sees the USB controller)."""
    domain = wrap("<smartcard mode='host'/><controller type='usb' model='none'/>")
    assert "USB is disabled for this domain" in libvirtd.domxml_to_native(domain).stderr
