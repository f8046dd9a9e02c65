"""The libvirt hook on the lab's real libvirtd 9.0: ``virsh start`` of a domain whose
``<metadata>`` names a config starts the bridge (no other step: the guest reads
the card), ``virsh destroy`` stops it, and ``virsh start`` again works.

The hook is installed with ``ccidbridge install-hook`` into the lab libvirtd's
private /etc/libvirt/hooks (a bind mount inside .ci/isolated), never the
machine's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ccidbridge.lifecycle.hook import bridge_pid
from lab.bridgeproc import write_config
from lab.pcsc import direct_transmit
from lab.vm import Console, cycling_initrd, domain_xml
from tests.lifecycle_helpers import cli, guest_reads_the_card, guest_vm
from tests.test_guest import APDUS

__all__ = ["guest_vm"]  # the fixture, used by name
pytestmark = [pytest.mark.guest, pytest.mark.libvirt, pytest.mark.stack]
STEPS = "wait-card:60000,connect," + ",".join(f"apdu:{a}" for a in APDUS)


def _private_etc_libvirt() -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == "/etc/libvirt" for line in f)


@pytest.fixture
def hooked(libvirtd, tmp_path: Path):  # noqa: ANN001
    """The lab libvirtd restarted with ccidbridge's hook; hook removed again afterwards."""
    assert _private_etc_libvirt(), "refusing: /etc/libvirt is not the lab's private mount"
    state, logs = tmp_path / "state", tmp_path / "log"
    out = cli("install-hook", "--dir", str(libvirtd.hooks_dir), "--state-dir", str(state),
              "--log-dir", str(logs))
    assert out.returncode == 0, out.stderr
    hook = libvirtd.hooks_dir / "qemu.d" / "ccidbridge"
    assert os.access(hook, os.X_OK)
    libvirtd.restart()
    try:
        yield state, logs
    finally:
        hook.unlink()
        libvirtd.restart()


def _domain(libvirtd, guest_image, tmp_path: Path, config: Path, name: str) -> Path:  # noqa: ANN001
    """Define a domain from what ``ccidbridge libvirt CONFIG --metadata CONFIG`` prints."""
    out = cli("libvirt", "--metadata", str(config), str(config))
    assert out.returncode == 0, out.stderr
    devices, _, meta = out.stdout.partition("<!-- paste into the domain's <metadata>")
    meta = meta.split("-->", 1)[1]
    console = tmp_path / f"{name}.console"
    initrd = cycling_initrd(guest_image, tmp_path, {"steps": STEPS})
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, guest_image, initrd, console, devices=devices,
                              metadata=meta))
    defined = libvirtd.virsh("define", str(xml))
    assert defined.returncode == 0, defined.stderr
    return console


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return  # exited, waiting to be reaped by the lab's reaper
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), f"bridge {pid} still runs"


@pytest.mark.parametrize("direction", ["bind", "connect"])
def test_virsh_start_starts_the_bridge_destroy_stops_it_start_again_works(
    libvirtd, hooked, guest_image, test_card, tmp_path: Path, direction: str
) -> None:
    """``bind``: QEMU listens, the bridge starts at ``started``; ``connect``: QEMU dials
    the bridge at start-up, so the bridge must listen before (``prepare``)."""
    state, logs = hooked
    card = test_card("dual")
    expected = direct_transmit(card.reader, [bytes.fromhex(a) for a in APDUS])
    sock = tmp_path / "vsc.sock"
    config = write_config(tmp_path / "vm.xml", sock, card.reader)
    if direction == "connect":
        config.write_text(config.read_text().replace("mode='bind'", "mode='connect'"))
    name = f"ccidbridge-hook-{direction}"
    console_path = _domain(libvirtd, guest_image, tmp_path, config, name)
    try:
        for round_ in (1, 2):
            card.restart()
            started = libvirtd.virsh("start", name)
            assert started.returncode == 0, started.stderr + libvirtd.qemu_log(name)
            pid = bridge_pid(state / f"{name}.pid")
            assert pid is not None, (logs / "hook.log").read_text()
            hook_log = (logs / "hook.log").read_text()
            assert f"{name}: started the bridge for {config} (pid {pid}); its log: " \
                f"{logs / (name + '.log')}" in hook_log
            guest_reads_the_card(Console(console_path), 1, expected)
            assert "QEMU synchronized" in (logs / f"{name}.log").read_text()
            assert libvirtd.destroy(name).returncode == 0
            _wait_gone(pid)
            assert not (state / f"{name}.pid").exists()
            assert f"{name}: stopped the bridge (pid {pid})" in (logs / "hook.log").read_text()
            assert hook_log.count("started the bridge") == round_
    finally:
        libvirtd.destroy(name)
        libvirtd.virsh("undefine", name)


def test_a_bad_config_keeps_the_domain_from_starting_with_the_config_error(
    libvirtd, hooked, guest_image, tmp_path: Path
) -> None:
    config = tmp_path / "broken.xml"
    config.write_text("<ccidbridge>\n  <smartcard mode='passthrough' type='unix'>\n"
                      "    <source mode='bind' path='/run/x.sock'/>\n  </smartcard>\n"
                      "</ccidbridge>\n")
    name = "ccidbridge-hook-broken"
    _domain(libvirtd, guest_image, tmp_path, config, name)
    config.write_text("<ccidbridge><smartcard mode='sideways'/></ccidbridge>\n")
    try:
        started = libvirtd.virsh("start", name)
        assert started.returncode != 0
        assert f"{config}:1:" in started.stderr, started.stderr
        assert libvirtd.virsh("domstate", name).stdout.strip() == "shut off"
    finally:
        libvirtd.destroy(name)
        libvirtd.virsh("undefine", name)


def test_domains_without_the_metadata_are_left_alone(
    libvirtd, hooked, guest_vm, tmp_path: Path
) -> None:
    state, logs = hooked
    name, console = guest_vm()
    console.wait_for("init waiting-usb n=1", 60)
    assert libvirtd.destroy(name).returncode == 0
    assert not state.exists() or not list(state.iterdir())
    assert not (logs / "hook.log").exists()

