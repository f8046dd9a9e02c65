"""ccidbridge's generators against the real libvirt (the oracle), one daemon per stack:
libvirt 9.0 + QEMU 7.2, 11.3 + QEMU 10.0 and 12.8 + QEMU 11.1 (lab.stacks).

For every example and every case of CASES below (the devices a generator must
get right, docs/libvirt-facts.md#L4 .. #L13):

* the config's devices (without ``<reader>``) in a minimal domain, through
  ``virsh define`` + ``dumpxml --inactive``, give exactly the lines
  ``ccidbridge libvirt`` prints, and through ``domxml-to-native`` exactly the
  arguments ``ccidbridge qemu-argv`` prints;
* ccidbridge's own output, pasted into a domain, is accepted by libvirt, is a
  fixpoint of its normalization, gives the same argv, and passes
  ``virt-xml-validate``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ccidbridge.config import loads
from ccidbridge.config.qemu_argv import extra_card_args
from ccidbridge.config.serving import notes
from ccidbridge.config.versions import QemuVersion, Target
from lab.examples_regen import EXAMPLES, configs
from tests.fixtures_libvirt import (
    commandline_args,
    config_devices,
    device_block_lines,
    native_args,
    needs_spice,
    ours,
    output_domain,
    sorted_ccid_args,
    sorted_controllers,
    target,
    wrap,
)

pytestmark = pytest.mark.libvirt
SPICE = "<graphics type='spice'/>\n"
KV_DEVICES = "<qemu:capabilities><qemu:del capability='device.json+hotplug'/></qemu:capabilities>"
KV_ALL = ("<qemu:capabilities><qemu:del capability='device.json+hotplug'/>"
          "<qemu:del capability='object.qapified'/></qemu:capabilities>")
# What each libvirt capability set corresponds to as a QEMU version (None: the stack's own).
VERSIONS = {"": None, KV_DEVICES: QemuVersion(6, 2), KV_ALL: QemuVersion(5, 2)}


def version_for(libvirtd, caps: str = "") -> Target:  # noqa: ANN001
    """What ccidbridge writes for the daemon's stack with ``caps`` taken away."""
    own = target(libvirtd.stack)
    qemu = VERSIONS[caps]
    return own if qemu is None else Target(qemu, own.libvirt)

# The cases worth testing a generator against, as ccidbridge config devices.
TCP = "<source mode='{mode}' host='{host}' service='2001'{tls}>{rc}</source>"
CASES = {
    "01-host": "<smartcard mode='host'/>",
    "02-host-certificates": "<smartcard mode='host-certificates'><certificate>cert1</certificate>"
    "<certificate>cert2</certificate><certificate>cert3</certificate></smartcard>",
    "03-host-certificates-database": "<smartcard mode='host-certificates'><certificate>cert1"
    "</certificate><certificate>cert2</certificate><certificate>cert3</certificate>"
    "<database>/tmp/foo</database></smartcard>",
    "04-escaping": "<smartcard mode='host-certificates'><certificate>a,b</certificate>"
    "<certificate>c d</certificate><certificate>e&amp;f</certificate>"
    "<database>/tmp/x,y</database></smartcard>",
    "05-tcp-bind-raw": "<smartcard mode='passthrough' type='tcp'><source mode='bind' "
    "host='127.0.0.1' service='2001'/><protocol type='raw'/></smartcard>",
    "06a-tcp-connect": "<smartcard mode='passthrough' type='tcp'><source mode='connect' "
    "host='127.0.0.1' service='2001'/><protocol type='raw'/></smartcard>",
    "06b-tcp-connect-no-protocol": "<smartcard mode='passthrough' type='tcp'><source "
    "mode='connect' host='127.0.0.1' service='2001'/></smartcard>",
    "06c-tcp-no-mode": "<smartcard mode='passthrough' type='tcp'><source host='127.0.0.1' "
    "service='2001'/></smartcard>",
    "07-tcp-telnet": "<smartcard mode='passthrough' type='tcp'><source mode='bind' "
    "host='0.0.0.0' service='2001'/><protocol type='telnet'/></smartcard>",
    "08-tcp-ipv6": "<smartcard mode='passthrough' type='tcp'><source mode='bind' host='::1' "
    "service='2001'/></smartcard>",
    "09a-reconnect": "<smartcard mode='passthrough' type='tcp'><source mode='connect' "
    "host='127.0.0.1' service='2001'><reconnect enabled='yes' timeout='10'/></source>"
    "</smartcard>",
    "09b-reconnect-disabled": "<smartcard mode='passthrough' type='tcp'><source mode='connect' "
    "host='127.0.0.1' service='2001'><reconnect enabled='no'/></source></smartcard>",
    "10a-tls-connect": "<smartcard mode='passthrough' type='tcp'><source mode='connect' "
    "host='127.0.0.1' service='2001' tls='yes'/></smartcard>",
    "10b-tls-bind": "<smartcard mode='passthrough' type='tcp'><source mode='bind' "
    "host='127.0.0.1' service='2001' tls='yes'/></smartcard>",
    "10c-tls-no": "<smartcard mode='passthrough' type='tcp'><source mode='connect' "
    "host='127.0.0.1' service='2001' tls='no'/></smartcard>",
    "11-unix-bind": "<smartcard mode='passthrough' type='unix'><source mode='bind' "
    "path='/tmp/smartcard.sock'/><protocol type='raw'/></smartcard>",
    "12-unix-connect": "<smartcard mode='passthrough' type='unix'><source mode='connect' "
    "path='/tmp/smartcard.sock'/></smartcard>",
    "13-unix-reconnect": "<smartcard mode='passthrough' type='unix'><source mode='connect' "
    "path='/tmp/channel/asdf'><reconnect enabled='yes' timeout='20'/></source></smartcard>",
    "14-unix-comma": "<smartcard mode='passthrough' type='unix'><source mode='bind' "
    "path='/tmp/a,b.sock'/></smartcard>",
    "15-spicevmc": "<smartcard mode='passthrough' type='spicevmc'/>",
    "17a-explicit-controller": "<controller type='ccid' index='0'/><smartcard mode='host'>"
    "<address type='ccid' controller='0' slot='0'/></smartcard>",
    "17b-controller-usb-port": "<controller type='ccid' index='0'><address type='usb' bus='0' "
    "port='2'/></controller><smartcard mode='host'/>",
    "19-spicevmc-channel": "<channel type='spicevmc'><target type='virtio'/></channel>",
    "19b-channel-named-and-card": "<smartcard mode='host'/><channel type='spicevmc'><target "
    "type='virtio' name='com.redhat.spice.0'/></channel><channel type='spicevmc'><target "
    "type='virtio'/></channel>",
    "x-log-file": "<smartcard mode='passthrough' type='tcp'><source mode='bind' host='h' "
    "service='2001' tls='yes'/><protocol type='telnet'/><log file='/tmp/l,g' append='on'/>"
    "</smartcard>",
    "x-udp": "<smartcard mode='passthrough' type='udp'><source mode='connect' host='1.2.3.4' "
    "service='5'/><source mode='bind' host='0.0.0.0' service='6'/></smartcard>",
    "x-pty": "<smartcard mode='passthrough' type='pty'/>",
    "x-file": "<smartcard mode='passthrough' type='file'><source path='/tmp/f'/></smartcard>",
    "x-null": "<smartcard mode='passthrough' type='null'/>",
    "x-spiceport": "<smartcard mode='passthrough' type='spiceport'><source channel='org.x'/>"
    "</smartcard>",
    "x-pipe": "<smartcard mode='passthrough' type='pipe'><source path='/tmp/p'/></smartcard>",
    "x-dev": "<smartcard mode='passthrough' type='dev'><source path='/dev/ttyS0'/></smartcard>",
    "x-vc": "<smartcard mode='passthrough' type='vc'/>",
    "x-stdio": "<smartcard mode='passthrough' type='stdio'/>",
    "x-file-append": "<smartcard mode='passthrough' type='file'><source path='/tmp/f' "
    "append='on'/></smartcard>",
    "x-udp-connect-only": "<smartcard mode='passthrough' type='udp'><source mode='connect' "
    "host='1.2.3.4' service='5'/></smartcard>",
    "x-channel-address": "<channel type='spicevmc'><target type='virtio'/><address "
    "type='virtio-serial' controller='0' bus='0' port='3'/></channel><channel "
    "type='spicevmc'><target type='virtio'/></channel>",
    "x-extra-controller": "<controller type='ccid' index='1'/><smartcard mode='host'/>",
}
# Case 22 (the old -device syntax) for cases 1, 2, 5 and 15, plus the TLS object.
OLD_SYNTAX = [("01-host", KV_DEVICES), ("02-host-certificates", KV_DEVICES),
              ("04-escaping", KV_DEVICES), ("05-tcp-bind-raw", KV_DEVICES),
              ("15-spicevmc", KV_DEVICES), ("19-spicevmc-channel", KV_DEVICES),
              ("10a-tls-connect", KV_DEVICES), ("10b-tls-bind", KV_ALL),
              ("09a-reconnect", KV_ALL)]


def _check(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, f"libvirt refused the {what}: {result.stderr.strip()}"
    return result.stdout


def _compare(libvirtd, config_text: str, caps: str = "", extra: str = "") -> None:
    version = version_for(libvirtd, caps)
    lay, lines, args = ours(config_text, version)
    spice = SPICE if needs_spice(config_text) else ""
    domain = wrap(config_devices(config_text) + spice + extra, caps)
    dumped = _check(libvirtd.define_dumpxml(domain, "ccidbridge-oracle"), "config")
    # libvirt lists the ccid controller it adds after those the config lists; ccidbridge
    # prints them all by index (which is what libvirt keeps when the output is pasted).
    assert sorted_controllers(device_block_lines(dumped)) == lines
    assert sorted_ccid_args(native_args(_check(libvirtd.domxml_to_native(domain),
                                               "config"))) == args
    # ccidbridge's output pasted into a domain: accepted, a fixpoint, same argv.
    pasted = output_domain(lay, version, spice + extra, caps)
    dumped = _check(libvirtd.define_dumpxml(pasted, "ccidbridge-oracle"), "output")
    assert device_block_lines(dumped) == lines
    assert native_args(_check(libvirtd.domxml_to_native(pasted), "output")) == args


@pytest.mark.parametrize("case", sorted(CASES))
def test_notes_case(libvirtd, case: str) -> None:
    _compare(libvirtd, f"<ccidbridge>{CASES[case]}</ccidbridge>")


@pytest.mark.parametrize(("case", "caps"), OLD_SYNTAX, ids=[
    f"{c}-{'kv-all' if k == KV_ALL else 'kv-device'}" for c, k in OLD_SYNTAX])
def test_notes_case_old_syntax(libvirtd, case: str, caps: str) -> None:
    config = f"<ccidbridge>{CASES[case]}</ccidbridge>"
    if caps == KV_ALL and not libvirtd.stack.is_host:
        # libvirt 11.3 and 12.8 no longer have object.qapified (-object is always JSON;
        # they drive no QEMU older than 6.0): deleting it changes nothing
        # (docs/libvirt-facts.md#L32)
        devices = config_devices(config)
        without = _check(libvirtd.domxml_to_native(wrap(devices, KV_ALL)), "config")
        assert native_args(without) == native_args(
            _check(libvirtd.domxml_to_native(wrap(devices, KV_DEVICES)), "config"))
        assert '"qom-type":"tls-creds-x509"' in without or "tls" not in case
        return
    _compare(libvirtd, config, caps)


def test_tablet_and_redirdevs_keep_their_ports(libvirtd) -> None:
    """Cases 18 and 20: the USB devices of the domain queue up behind the ccid controller."""
    config = f"<ccidbridge>{CASES['05-tcp-bind-raw']}</ccidbridge>"
    extra = ("<controller type='usb' index='0' model='qemu-xhci'/>"
             "<input type='tablet' bus='usb'/><redirdev bus='usb' type='spicevmc'/>"
             "<redirdev bus='usb' type='spicevmc'/>" + SPICE)
    _compare(libvirtd, config, extra=extra)
    version = version_for(libvirtd)
    lay, _, _ = ours(config, version)
    native = _check(libvirtd.domxml_to_native(output_domain(lay, version, extra)), "output")
    assert '"driver":"usb-tablet","id":"input0","bus":"usb.0","port":"2"' in native
    assert '"driver":"usb-redir","chardev":"charredir1","id":"redir1","bus":"usb.0","port":"4"' \
        in native


@pytest.mark.parametrize("example", configs(), ids=lambda p: p.stem)
def test_example(libvirtd, example: Path) -> None:
    text = example.read_text(encoding="utf-8")
    version = version_for(libvirtd)
    lay, lines, args = ours(text, version)
    spice = SPICE if needs_spice(text) else ""
    if len(lay.cards) == 1:
        _compare(libvirtd, text)
    else:  # the reason for <qemu:commandline>: libvirt takes one <smartcard>
        refused = libvirtd.define_dumpxml(wrap(config_devices(text) + spice), "x")
        assert "lacks multiple smartcard support" in refused.stderr
    pasted = output_domain(lay, version, spice)
    dumped = _check(libvirtd.define_dumpxml(pasted, "ccidbridge-oracle"), "output")
    assert device_block_lines(dumped) == lines
    ours_cmdline = [a for p in lay.extra_cards for a in extra_card_args(p, version)]
    assert commandline_args(dumped) == ours_cmdline
    assert native_args(_check(libvirtd.domxml_to_native(pasted), "output")) == args


@pytest.mark.parametrize("example", configs(), ids=lambda p: p.stem)
def test_example_output_passes_virt_xml_validate(qemu_stack, tmp_path: Path,  # noqa: ANN001
                                                 example: Path) -> None:
    text = example.read_text(encoding="utf-8")
    version = target(qemu_stack)
    lay, _, _ = ours(text, version)
    domain = tmp_path / "domain.xml"
    domain.write_text(output_domain(lay, version, SPICE if needs_spice(text) else ""))
    qemu_stack.enter()
    result = subprocess.run(qemu_stack.command(["virt-xml-validate", str(domain), "domain"]),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_spicevmc_without_graphics(libvirtd) -> None:
    """Case 16: libvirt refuses spicevmc without SPICE graphics; check says so up front."""
    config = f"<ccidbridge>{CASES['15-spicevmc']}</ccidbridge>"
    refused = libvirtd.define_dumpxml(wrap(config_devices(config)), "x")
    assert "chardev 'spicevmc' not supported without spice graphics" in refused.stderr
    assert any("not supported without spice graphics" in n for n in notes(loads(config)))


BUSY = ("<controller type='usb' index='0' model='qemu-xhci'/>"
        "<input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>"
        "<controller type='virtio-serial' index='0'/>"
        "<channel type='unix'><source mode='bind'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>")


@pytest.mark.parametrize("example", configs(), ids=lambda p: p.stem)
def test_portable_output_fits_a_busy_domain(libvirtd, example: Path) -> None:
    """``--portable`` pasted next to a tablet on USB port 1 and a guest-agent channel."""
    text = example.read_text(encoding="utf-8")
    version = version_for(libvirtd)
    lay, _, args = ours(text, version)
    extra = BUSY + (SPICE if needs_spice(text) else "")
    portable = output_domain(lay, version, extra, portable=True)
    native = native_args(_check(libvirtd.domxml_to_native(portable), "portable output"))
    cards = [a for a in args if "ccid-card" in a or a.startswith(("socket", "spicevmc,id=charsm"))]
    assert [a for a in native if a in cards] == cards
    assert '"driver":"usb-ccid","id":"ccid0","bus":"usb.0","port":"2"' in " ".join(native)
    # the normal form collides with the tablet's port or the agent's virtio-serial controller
    refused = libvirtd.domxml_to_native(output_domain(lay, version, extra)).stderr
    assert ("Duplicate USB address bus 0 port 1" in refused
            or "Multiple 'virtio-serial' controllers with index '0'" in refused)


@pytest.mark.parametrize("example", ["tcp-bind", "two-cards"])
def test_t1_override_reaches_libvirts_argv(libvirtd, example: str) -> None:
    """For a QEMU whose usb-ccid offers T=1, ccidbridge's <qemu:override> (pasted into the
    domain) is accepted, survives dumpxml, and libvirt's argv equals ccidbridge's with
    x-t1-support=false on every usb-ccid (docs/libvirt-facts.md#L33).  Not started: no QEMU
    release has the property."""
    own = version_for(libvirtd)
    version = Target(own.qemu, own.libvirt, usb_ccid_t1=True)
    text = (EXAMPLES / f"{example}.xml").read_text(encoding="utf-8")
    lay, lines, args = ours(text, version)
    pasted = output_domain(lay, version)
    dumped = _check(libvirtd.define_dumpxml(pasted, "ccidbridge-oracle"), "output")
    assert device_block_lines(dumped) == lines
    assert "<qemu:property name='x-t1-support' type='bool' value='false'/>" in dumped
    native = native_args(_check(libvirtd.domxml_to_native(pasted), "output"))
    assert native == args
    assert sum('"x-t1-support":false' in a for a in native) == len(lay.controllers)
