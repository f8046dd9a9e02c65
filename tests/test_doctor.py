"""``ccidbridge doctor``: the rules (pure, with made-up facts) and the real probes on a
healthy and on broken setups (QEMU without the devices, no pcscd, a card held
exclusively by another program, a domain without USB)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ccidbridge.lifecycle import doctor as d
from ccidbridge.lifecycle.doctor import Status
from lab import child_env
from lab.bridgeproc import write_config
from lab.libvirtd import URI
from tests.lifecycle_helpers import cli, guest_vm

__all__ = ["guest_vm"]  # the fixture, used by name
QEMU = d.QemuFacts("qemu", "version 7.2.22", devices=frozenset({"usb-ccid", "ccid-card-passthru",
                                                               "qemu-xhci"}),
                   ccid_properties=("debug", "port"))
READERS = (d.ReaderFacts("R 00", True, b"\x3b\x00"), d.ReaderFacts("R 01", False))
PCSC = d.PcscFacts(True, version="1.9.9", readers=READERS,
                   clients=(d.Client(1, "pcscd"), d.Client(50, "scdaemon")))


# ------------------------------------------------------------------ the rules, pure


def test_qemu_with_both_devices_is_ok_and_lists_usb_ccid_options() -> None:
    [c] = d.check_qemu(QEMU)
    assert c.status is Status.OK and "usb-ccid options: debug, port" in c.text


def test_qemu_without_a_device_fails_naming_it_and_the_fix() -> None:
    [c] = d.check_qemu(d.QemuFacts("q", "v", devices=frozenset({"usb-ccid"})))
    assert c.status is Status.FAIL and "lacks ccid-card-passthru" in c.text
    assert "CONFIG_USB_SMARTCARD" in c.fix
    [c] = d.check_qemu(d.QemuFacts("/x/qemu", error="No such file"))
    assert c.status is Status.FAIL and "--qemu PATH" in c.fix


def test_pcscd_down_fails_and_card_checks_are_skipped() -> None:
    down = d.PcscFacts(False, error="pcscd is not running (SCARD_E_NO_SERVICE)")
    [c] = d.check_pcscd(down)
    assert c.status is Status.FAIL and "pcscd.socket" in c.fix
    assert d.check_cards([d.CardNeed("c", "any reader", (), (), True)], down, 0) == []
    assert d.check_clients(down, 0) == []


@pytest.mark.parametrize(("need", "status", "words"), [
    (d.CardNeed("c", "reader 'X'", (), (), True), Status.FAIL, "no reader 'X'"),
    (d.CardNeed("c", "reader 'R 01'", ("R 01",), (), True), Status.WARN, "no card yet"),
    (d.CardNeed("c", "reader 'R 00'", ("R 00",), (), True), Status.WARN, "another ATR"),
    (d.CardNeed("c", "reader 'R 00'", ("R 00",), ("R 00",), True), Status.OK, "exclusively"),
])
def test_card_rules(need: d.CardNeed, status: Status, words: str) -> None:
    [c] = d.check_cards([need], PCSC, 0)
    assert c.status is status and words in c.text


def test_a_card_held_exclusively_fails_and_names_the_other_clients() -> None:
    held = d.PcscFacts(True, readers=(d.ReaderFacts("R 00", True, b"\x3b", True),),
                       clients=(d.Client(1, "pcscd"), d.Client(7, "scdaemon"), d.Client(9, "me")))
    [c] = d.check_cards([d.CardNeed("c", "reader 'R 00'", ("R 00",), ("R 00",), True)], held, 9)
    assert c.status is Status.FAIL
    assert "held exclusively" in c.text and "scdaemon (pid 7)" in c.text and "me" not in c.text


def test_known_holders_get_their_own_fix_and_pcscd_itself_is_no_client() -> None:
    [c] = d.check_clients(PCSC, 0)
    assert c.status is Status.WARN and "scdaemon (pid 50)" in c.text
    assert "gpgconf --kill scdaemon" in c.fix
    alone = d.PcscFacts(True, clients=(d.Client(1, "pcscd"), d.Client(5, "doctor")))
    assert [x.status for x in d.check_clients(alone, 5)] == [Status.OK]


@pytest.mark.parametrize(("directory", "status", "words"), [
    (d.SocketDir("c", "/run/x", True, False), Status.FAIL, "does not exist"),
    (d.SocketDir("c", "/tmp", True, True, mode=stat.S_IFDIR | 0o1777, writable=True),
     Status.OK, "1777"),
    (d.SocketDir("c", "/srv", True, True, mode=stat.S_IFDIR | 0o777, writable=True),
     Status.WARN, "writable by everyone"),
    (d.SocketDir("c", "/run/q", True, True, owner="q", mode=stat.S_IFDIR | 0o755),
     Status.FAIL, "not writable"),
    (d.SocketDir("c", "/run/q", False, True, owner="q", mode=stat.S_IFDIR | 0o755),
     Status.OK, "QEMU creates the socket"),
])
def test_socket_dir_rules(directory: d.SocketDir, status: Status, words: str) -> None:
    c = d.check_socket_dir(directory)
    assert c.status is status and words in c.text


def test_libvirt_rules() -> None:
    assert d.check_libvirt(d.LibvirtFacts("u", error="down"))[0].status is Status.WARN
    assert d.check_libvirt(d.LibvirtFacts("u", error="down", domain="vm"))[0].status \
        is Status.FAIL
    ok = d.check_libvirt(d.LibvirtFacts("u", "9.0.0", "QEMU 7.2.0", domain="vm",
                                        usb_models=("qemu-xhci",)))
    assert [c.status for c in ok] == [Status.OK, Status.OK]
    for models, words in (((), "no USB controller"), (("none",), "model='none'")):
        c = d.check_libvirt(d.LibvirtFacts("u", "9.0.0", domain="vm", usb_models=models))[1]
        assert c.status is Status.FAIL and words in c.text and "qemu-xhci" in c.fix


def test_report_fails_on_any_fail_only() -> None:
    r = d.Report()
    r.add(d.Check("a", Status.OK, ""), d.Check("b", Status.WARN, "", "x"))
    assert r.exit_status() == 0
    r.add(d.Check("c", Status.FAIL, "", "y"))
    assert r.exit_status() == 1
    assert r.checks[2].line() == "[FAIL] c: \n       fix: y"


# ------------------------------------------------------------------ the real probes


def _config(tmp_path: Path, reader: str) -> Path:
    return write_config(tmp_path / "vm.xml", tmp_path / "vsc.sock", reader)


@pytest.mark.stack
def test_healthy_setup_passes_every_check(test_card, tmp_path: Path) -> None:
    card = test_card("dual")
    out = cli("doctor", str(_config(tmp_path, card.reader)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[FAIL]" not in out.stdout
    assert "[ ok ] qemu: qemu-system-x86_64" in out.stdout
    assert "has usb-ccid and ccid-card-passthru; usb-ccid options:" in out.stdout
    assert "[ ok ] pcscd: pcsc-lite 1.9.9 reachable" in out.stdout
    assert f"card in '{card.reader}' can be served exclusively" in out.stdout
    assert f"{tmp_path} root:root" in out.stdout
    assert "run would serve this config" in out.stdout


@pytest.mark.stack
def test_qemu_without_the_smartcard_devices_fails(test_card, tmp_path: Path) -> None:
    card = test_card("dual")
    fake = tmp_path / "qemu-no-ccid"
    fake.write_text("#!/bin/sh\ncase \"$*\" in\n"
                    "  *--version*) echo 'QEMU emulator version 7.2.0 (no smartcard)';;\n"
                    "  *'device help'*) echo 'name \"qemu-xhci\", bus PCI';;\n"
                    "  *) echo \"Device 'usb-ccid' not found\" >&2; exit 1;;\nesac\n")
    fake.chmod(0o755)
    out = cli("doctor", str(_config(tmp_path, card.reader)), "--qemu", str(fake))
    assert out.returncode == 1
    assert f"[FAIL] qemu: {fake} (version 7.2.0 (no smartcard)) lacks usb-ccid and " \
        "ccid-card-passthru" in out.stdout
    assert "run would NOT serve" in out.stdout
    env_run = subprocess.run([sys.executable, "-m", "ccidbridge", "doctor"], text=True,
                             capture_output=True, env=child_env({"CCIDBRIDGE_QEMU": str(fake)}))
    assert env_run.returncode == 1 and f"[FAIL] qemu: {fake}" in env_run.stdout


@pytest.mark.stack
def test_no_pcscd_fails(pcsc_stack, tmp_path: Path) -> None:
    pcsc_stack.stop()  # the next test's fixture starts it again
    out = cli("doctor", str(_config(tmp_path, "Virtual PCD 00 00")))
    assert out.returncode == 1
    assert "[FAIL] pcscd: pcsc-lite 1.9.9 not reachable: pcscd is not running" in out.stdout
    assert "systemctl start pcscd.socket" in out.stdout


HOLDER = """
import sys, time
from smartcard import scard
hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
hr, h, p = scard.SCardConnect(ctx, sys.argv[1], scard.SCARD_SHARE_EXCLUSIVE,
                              scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
print(hex(hr & 0xFFFFFFFF), flush=True)
sys.stdin.readline()  # until the test is done: then let go as a program does
scard.SCardDisconnect(h, scard.SCARD_LEAVE_CARD)
scard.SCardReleaseContext(ctx)
"""


@pytest.mark.stack
def test_card_held_exclusively_by_another_program_fails_naming_it(
    test_card, tmp_path: Path
) -> None:
    card = test_card("dual")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, card.reader],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0x0"
        out = cli("doctor", str(_config(tmp_path, card.reader)))
    finally:
        holder.communicate("done\n", timeout=10)
    assert out.returncode == 1, out.stdout
    assert f"[FAIL] card {tmp_path}/vm.xml:2 smartcard0: the card in '{card.reader}' is " \
        "held exclusively by another program" in out.stdout
    assert f"(pid {holder.pid})" in out.stdout
    assert f"[warn] pcsc clients: python (pid {holder.pid}) is connected to pcscd" in out.stdout


@pytest.mark.stack
@pytest.mark.libvirt
def test_domain_usb_controller_is_checked(libvirtd, guest_vm, test_card, tmp_path) -> None:
    card = test_card("dual")
    config = str(_config(tmp_path, card.reader))
    good, _ = guest_vm(define_only=True)
    out = cli("doctor", config, "--domain", good, "-c", URI)
    assert out.returncode == 0, out.stdout
    assert f"[ ok ] libvirt: {URI}: libvirt 9.0.0, hypervisor QEMU 7.2" in out.stdout
    assert f"[ ok ] domain {good}: USB controller (qemu-xhci)" in out.stdout
    bare, _ = guest_vm(usb="none", define_only=True)
    out = cli("doctor", config, "--domain", bare, "-c", URI)
    assert out.returncode == 1
    assert f"[FAIL] domain {bare}: has USB disabled (model='none')" in out.stdout
    out = cli("doctor", config, "--domain", "nope", "-c", URI)
    assert out.returncode == 1 and "[FAIL] domain nope:" in out.stdout


def test_invalid_config_exits_2_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<ccidbridge>\n<smartcard mode='sideways'/>\n</ccidbridge>\n")
    out = cli("doctor", str(bad))
    assert out.returncode == 2 and f"{bad}:2:" in out.stdout
    assert os.path.exists(bad)
