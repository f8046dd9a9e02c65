"""pytest fixtures: a throwaway libvirtd (oracle), and helpers that cut its output down
to the devices ccidbridge renders.

``libvirtd`` is parametrized over the three stacks (lab.stacks): libvirt 9.0
with QEMU 7.2 (this machine), 11.3 with QEMU 10.0 (Debian 13) and 12.8 with
QEMU 11.1 (sid), so every oracle test runs against each; ``target(stack)`` is
what ccidbridge must write for that stack.  The daemon only starts inside
``.ci/isolated`` (see lab.libvirtd); anywhere else, or when a stack's root is
missing, the fixture fails loudly (one line naming the stack and why).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from lxml import etree

from ccidbridge.config import loads
from ccidbridge.config.layout import Layout, layout
from ccidbridge.config.libvirt_xml import device_lines, domain_lines
from ccidbridge.config.qemu_argv import argv
from ccidbridge.config.versions import LibvirtVersion, QemuVersion, Target, Versions
from lab.libvirtd import Libvirtd, LibvirtdError, isolation_problem
from lab.stacks import STACKS, Stack

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "libvirt"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DOMAIN = """<domain type='qemu' xmlns:qemu='{ns}'>
  <name>{name}</name>
  <memory unit='KiB'>219136</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{devices}
  </devices>
{outside}
</domain>
"""


def wrap(devices: str, outside: str = "", name: str = "ccidbridge-oracle") -> str:
    """A minimal domain (libvirt's QEMUGuest1 shape: pc, x86_64, TCG) holding ``devices``."""
    return DOMAIN.format(ns=QEMU_NS, name=name, devices=devices, outside=outside)


def libvirt_of(version: Versions) -> LibvirtVersion:
    """The libvirt a renderer argument stands for (a bare QemuVersion: 9.0, layout's default)."""
    return version.libvirt if isinstance(version, Target) else LibvirtVersion(9, 0)


def target(stack: Stack) -> Target:
    """What ccidbridge writes for ``stack``'s QEMU driven by its libvirt."""
    return Target(QemuVersion.parse(stack.qemu), LibvirtVersion.parse(stack.libvirt))


def require_stack(stack: Stack) -> None:
    """Fail (never skip) with one line when ``stack`` cannot run here."""
    problem = stack.problem()
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session", params=STACKS, ids=str)
def qemu_stack(request: pytest.FixtureRequest) -> Stack:
    """Each of the three stacks in turn (lab.stacks).  A root's programs run chrooted in
    .ci/isolated only: outside it (plain pytest) that is a skip, under make test never."""
    require_stack(request.param)
    if not request.param.is_host and os.environ.get("CCIDBRIDGE_ISOLATED") != "1":
        pytest.skip(f"the {request.param} stack runs chrooted inside .ci/isolated")
    return request.param


@pytest.fixture(scope="session")
def libvirtd(qemu_stack: Stack):
    """A private libvirtd of ``qemu_stack`` for the session (qemu:///system, namespaced)."""
    problem = isolation_problem(qemu_stack)
    if problem:
        pytest.fail(f"refusing to start libvirtd ({qemu_stack}): {problem}", pytrace=False)
    daemon = Libvirtd(cache_dir=CACHE / qemu_stack.name, stack=qemu_stack)
    try:
        daemon.start()
    except LibvirtdError as exc:
        pytest.fail(f"libvirtd ({qemu_stack}) did not start: {exc}", pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


# ------------------------------------------------------------ comparing with the oracle

OUR_DRIVERS = {"usb-ccid", "ccid-card-passthru", "ccid-card-emulated", "virtio-serial-pci",
               "virtserialport"}
_OPEN = re.compile(
    r"^    <(controller type='(ccid|virtio-serial)'|smartcard|channel type='spicevmc')"
)


def device_block_lines(dumpxml: str) -> list[str]:
    """dumpxml's lines for ccid/virtio-serial controllers, smartcards and spicevmc channels.

    The virtio-serial controller's PCI address depends on the rest of the
    domain, so it is dropped (ccidbridge prints the controller without one).
    """
    out: list[str] = []
    block: list[str] | None = None
    for line in dumpxml.splitlines():
        if block is None:
            if _OPEN.match(line):
                if line.endswith("/>"):
                    out.append(line)
                else:
                    block = [line]
            continue
        block.append(line)
        if line.startswith("    </"):
            if "virtio-serial" in block[0]:
                block = [ln for ln in block if "<address type='pci'" not in ln]
                if len(block) == 2:
                    block = [block[0][:-1] + "/>"]
            out += block
            block = None
    return out


def sorted_controllers(lines: list[str]) -> list[str]:
    """``lines`` with the ccid controller blocks (3 lines each) put in index order."""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("    <controller type='ccid'")]
    if not starts:
        return lines
    blocks = sorted((lines[i:i + 3] for i in starts), key=lambda b: int(b[0].split("'")[3]))
    first = starts[0]
    rest = [ln for i, ln in enumerate(lines) if not any(s <= i < s + 3 for s in starts)]
    head = [ln for i, ln in enumerate(lines[:first])]
    tail = rest[len(head):]
    return head + [ln for b in blocks for ln in b] + tail


def sorted_ccid_args(args: list[str]) -> list[str]:
    """``args`` with the usb-ccid devices (consecutive in libvirt's argv) in id order."""
    pairs = [args[i:i + 2] for i in range(0, len(args), 2)]
    ccid = [i for i, (_, v) in enumerate(pairs) if "usb-ccid" in v]
    ordered = sorted((pairs[i] for i in ccid), key=lambda p: p[1])
    for i, pair in zip(ccid, ordered, strict=True):
        pairs[i] = pair
    return [x for p in pairs for x in p]


def commandline_args(dumpxml: str) -> list[str]:
    root = etree.fromstring(dumpxml.encode())
    return [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]


def _strip_pci(driver: str, value: str) -> str:
    if driver != "virtio-serial-pci":
        return value
    if value.startswith("{"):
        props = json.loads(value)
        props.pop("bus", None)
        props.pop("addr", None)
        return json.dumps(props, separators=(",", ":"))
    return re.sub(r",(bus|addr)=[^,]*", "", value)


def our_args(args: list[str]) -> list[str]:
    """From an argv, the options for our devices (as pairs flattened), other devices dropped."""
    out: list[str] = []
    it = iter(args)
    for opt in it:
        if opt not in ("-device", "-chardev", "-object"):
            continue
        value = next(it)
        if opt == "-device":
            driver = json.loads(value)["driver"] if value.startswith("{") else value.split(",")[0]
            if driver in OUR_DRIVERS:
                out += [opt, _strip_pci(driver, value)]
        elif opt == "-chardev":
            if re.search(r",id=char(smartcard|channel)\d", value):
                out += [opt, value]
        elif "tls-creds-x509" in value:
            out += [opt, value]
    return out


def native_args(native: str) -> list[str]:
    return our_args(shlex.split(native))


def config_devices(config_text: str) -> str:
    """The config's device elements as libvirt sees them: no <reader>, no comments."""
    root = etree.fromstring(config_text.encode())
    for node in root.xpath("//reader | /ccidbridge//comment()"):
        node.getparent().remove(node)
    return "".join(etree.tostring(child, encoding="unicode") for child in root)


def needs_spice(text: str) -> bool:
    return "spicevmc" in text or "spiceport" in text


def output_domain(lay: Layout, version: Versions, extra_devices: str = "",
                  outside: str = "", portable: bool = False) -> str:
    """A domain holding ccidbridge's libvirt output (and what else the case needs)."""
    devices = "\n".join("    " + ln for ln in device_lines(lay, portable)) + "\n" + extra_devices
    commandline = "\n".join(domain_lines(lay, version))
    return wrap(devices, commandline + "\n" + outside)


def ours(config_text: str, version: Versions) -> tuple[Layout, list[str], list[str]]:
    """Our layout, libvirt device lines (indented as in dumpxml), and device argv."""
    lay = layout(loads(config_text).devices, libvirt_of(version))
    lines = ["    " + ln for ln in device_lines(lay)]
    return lay, lines, our_args(argv(lay, version))
