"""``ccidbridge attach`` / ``detach`` on a real libvirt 9.0 domain running the lab
guest (pcscd + libccid): the reader arrives, the guest reads the card with the
host's answers, SIGTERM takes it away again, and a second attach works.

Also ``--qmp`` against a QEMU run by hand, and every refusal leaves QEMU as
it was (no orphan device or chardev).
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from lab.bridgeproc import write_config
from lab.libvirtd import URI
from lab.pcsc import direct_transmit
from lab.qemu import Qemu, free_tcp_port
from tests.lifecycle_helpers import (
    CliProcess,
    attach_args,
    cli,
    guest_reads_the_card,
    guest_vm,
    info_usb,
    ours_in_qemu,
)
from tests.test_guest import APDUS

__all__ = ["guest_vm"]  # the fixture, used by name
pytestmark = [pytest.mark.guest, pytest.mark.libvirt, pytest.mark.stack]
STEPS = "wait-card:60000,connect," + ",".join(f"apdu:{a}" for a in APDUS)


def test_libvirt_90_cannot_hot_plug_the_ccid_devices(libvirtd, guest_vm, tmp_path: Path) -> None:
    """Why attach uses the monitor (docs/lifecycle.md#H1): if this ever fails,
    libvirt learnt to hot-plug them and attach should use libvirt's own way."""
    name, _ = guest_vm()
    ctl = tmp_path / "ctl.xml"
    ctl.write_text("<controller type='ccid' index='0'/>")
    out = libvirtd.virsh("attach-device", name, str(ctl), "--live")
    assert out.returncode != 0
    assert "'ccid' controller cannot be hot plugged" in out.stderr
    card = tmp_path / "card.xml"
    card.write_text("<smartcard mode='passthrough' type='unix'><source mode='bind' "
                    f"path='{tmp_path}/x.sock'/><address type='ccid' controller='0' slot='0'/>"
                    "</smartcard>")
    out = libvirtd.virsh("attach-device", name, str(card), "--live")
    assert out.returncode != 0
    assert "live attach of device 'smartcard' is not supported" in out.stderr


def test_attach_plugs_the_reader_sigterm_unplugs_it_attach_again_works(
    libvirtd, guest_vm, test_card, tmp_path: Path
) -> None:
    card = test_card("dual")
    expected = direct_transmit(card.reader, [bytes.fromhex(a) for a in APDUS])
    card.restart()
    config = write_config(tmp_path / "vm.xml", tmp_path / "vsc.sock", card.reader)
    name, console = guest_vm(STEPS, cycles=3)  # the third keeps it running
    console.wait_for("init waiting-usb n=1", 60)
    assert ours_in_qemu(libvirtd, name) == []

    first = CliProcess(attach_args(name, config), tmp_path / "attach1.log")
    try:
        guest_reads_the_card(console, 1, expected)
        assert "QEMU USB CCID" in info_usb(libvirtd, name)
        assert len(ours_in_qemu(libvirtd, name)) == 3
        assert first.stop(signal.SIGTERM) == 0
    finally:
        first.close()
    console.wait_for("init usb-gone n=1", 30)
    assert "QEMU USB CCID" not in info_usb(libvirtd, name)
    assert ours_in_qemu(libvirtd, name) == []
    log = first.text()
    assert "tainted" in log and "detached" in log
    assert "tainted: custom monitor" in libvirtd.virsh("dominfo", name).stdout

    card.restart()  # a fresh card, so the answers are the first run's again
    second = CliProcess(attach_args(name, config), tmp_path / "attach2.log")
    try:
        guest_reads_the_card(console, 2, expected)
        # killed without a goodbye: the devices stay until `detach`
        second.stop(signal.SIGKILL)
    finally:
        second.close()
    assert len(ours_in_qemu(libvirtd, name)) == 3
    out = cli("detach", "-c", URI, name, str(config))
    assert out.returncode == 0, out.stderr
    assert "removed ccidbridge-" in out.stdout
    console.wait_for("init usb-gone n=2", 30)
    assert ours_in_qemu(libvirtd, name) == []
    assert "QEMU USB CCID" not in info_usb(libvirtd, name)
    out = cli("detach", "-c", URI, name)
    assert out.returncode == 0 and "nothing of ccidbridge's" in out.stdout


def test_attach_refuses_a_domain_that_is_not_running(guest_vm, test_card, tmp_path) -> None:
    card = test_card("dual")
    config = write_config(tmp_path / "vm.xml", tmp_path / "vsc.sock", card.reader)
    name, _ = guest_vm(define_only=True)
    out = cli(*attach_args(name, config))
    assert out.returncode == 1
    assert f"domain {name} is not running (shut off)" in out.stderr
    assert f"virsh -c {URI} start {name}" in out.stderr
    out = cli(*attach_args("no-such-domain", config))
    assert out.returncode == 1 and "no-such-domain" in out.stderr
    assert "Traceback" not in out.stderr


def test_attach_twice_socket_in_use_card_not_found_no_usb_leave_qemu_as_it_was(
    libvirtd, guest_vm, test_card, tmp_path: Path
) -> None:
    card = test_card("dual")
    config = write_config(tmp_path / "vm.xml", tmp_path / "vsc.sock", card.reader)
    name, console = guest_vm()
    console.wait_for("init waiting-usb n=1", 60)
    first = CliProcess(attach_args(name, config), tmp_path / "attach1.log")
    try:
        first.wait_log("attached 1 card(s)")
        held = sorted(ours_in_qemu(libvirtd, name))
        other = write_config(tmp_path / "other.xml", tmp_path / "other.sock", card.reader)
        out = cli(*attach_args(name, other))
        assert out.returncode == 1
        assert f"already has a card attached by ccidbridge (process {first.proc.pid})" \
            in out.stderr
        assert sorted(ours_in_qemu(libvirtd, name)) == held
        out = cli("detach", "-c", URI, name)  # a live attach is left alone
        assert out.returncode == 1 and f"kill {first.proc.pid}" in out.stderr
        assert sorted(ours_in_qemu(libvirtd, name)) == held
        assert first.stop() == 0
    finally:
        first.close()
    assert ours_in_qemu(libvirtd, name) == []

    busy = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX) as squatter:
        squatter.bind(str(busy))
        squatter.listen(1)
        out = cli(*attach_args(name, write_config(tmp_path / "busy.xml", busy, card.reader)))
    assert out.returncode == 1 and "is in use" in out.stderr, out.stderr
    assert ours_in_qemu(libvirtd, name) == []

    missing = write_config(tmp_path / "missing.xml", tmp_path / "m.sock", "No Such Reader")
    out = cli(*attach_args(name, missing))
    assert out.returncode == 1
    assert "card not found: no reader 'No Such Reader'" in out.stderr
    assert card.reader in out.stderr and "ccidbridge readers" in out.stderr
    assert ours_in_qemu(libvirtd, name) == []

    bare, _ = guest_vm(usb="none")
    out = cli(*attach_args(bare, config))
    assert out.returncode == 1
    assert f"domain {bare} has no USB controller" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert ours_in_qemu(libvirtd, bare) == []


@pytest.mark.parametrize(("kind", "mode"), [("unix", "connect"), ("tcp", "connect"),
                                          ("tcp", "bind")])
def test_attach_over_qmp_to_a_qemu_run_by_hand(
    test_card, tmp_path: Path, kind: str, mode: str
) -> None:
    """``--qmp``: no libvirt.  ``mode='connect'`` makes QEMU dial the (listening)
    bridge, ``mode='bind'`` makes QEMU listen."""
    card = test_card("dual")
    sock = tmp_path / "bridge.sock"
    source = (f"path='{sock}'" if kind == "unix"
              else f"host='127.0.0.1' service='{free_tcp_port()}'")
    config = tmp_path / "hand.xml"
    config.write_text(
        f"<ccidbridge><smartcard mode='passthrough' type='{kind}'>"
        f"<source mode='{mode}' {source}/><reader name='{card.reader}'/>"
        "</smartcard></ccidbridge>")
    qmp_path = tmp_path / "attach.qmp"
    args = ["-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64",
            "-device", "qemu-xhci,id=usb", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    with Qemu(args, workdir=tmp_path / "qemu") as qemu:
        attach = CliProcess(["attach", "-v", "--qmp", str(qmp_path), "by-hand", str(config)],
                            tmp_path / "attach.log")
        try:
            attach.wait_log("QEMU synchronized (card present)")
            usb = qemu.hmp("info usb")
            assert "QEMU USB CCID" in usb and "ccidbridge-" in usb
            assert "tainted" not in attach.text()  # no libvirt here
            assert attach.stop() == 0
        finally:
            attach.close()
        assert "ccidbridge-" not in qemu.hmp("info usb")
        assert not any(c["label"].startswith("ccidbridge-") for c in qemu.qmp("query-chardev"))
        assert not sock.exists()
