"""--qemu-version / --libvirt-version: the output follows the pair, unknown versions are
refused by name, and the usb-ccid T=1 switch follows the probed property, not a version.

The oracle suite (tests/test_libvirt_oracle*.py) proves each stack's own pair
against the real libvirt; these pin the combinations no stack here runs (libvirt
9.0 driving a newer QEMU) and the command line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ccidbridge.cli import main
from ccidbridge.config import installed, loads
from ccidbridge.config.layout import layout
from ccidbridge.config.libvirt_xml import render as render_libvirt
from ccidbridge.config.qemu_argv import argv
from ccidbridge.config.versions import LibvirtVersion, QemuVersion, Target
from lab.examples_regen import EXAMPLES

RECONNECT = (EXAMPLES / "reconnect.xml").read_text()


def _chardev(target: Target) -> str:
    args = argv(layout(loads(RECONNECT).devices, target.libvirt), target)
    return next(args[i + 1] for i, a in enumerate(args) if a == "-chardev")


@pytest.mark.parametrize(("qemu", "libvirt", "form"), [
    ("7.2", "9.0", "reconnect=5"),  # Debian 12
    ("10.0", "9.0", "reconnect=5"),  # Debian 12 + backported QEMU: libvirt 9.0 knows no -ms
    ("10.0", "11.3", "reconnect-ms=5000"),  # Debian 13
    ("11.1", "12.8", "reconnect-ms=5000"),  # sid
    ("9.1", "12.8", "reconnect=5"),  # QEMU before 9.2 has no reconnect-ms
])
def test_reconnect_form_depends_on_both(qemu: str, libvirt: str, form: str) -> None:
    target = Target(QemuVersion.parse(qemu), LibvirtVersion.parse(libvirt))
    assert _chardev(target).endswith("," + form)


def test_libvirt_90_with_qemu_111_is_flagged_by_check(tmp_path: Path, capsys) -> None:
    config = tmp_path / "vm.xml"
    config.write_text(RECONNECT)
    assert main(["check", "--qemu-version", "11.1", "--libvirt-version", "9.0",
                 str(config)]) == 0
    out = capsys.readouterr().out
    assert "QEMU 11.1 no longer accepts" in out
    assert "output is for QEMU 11.1 with libvirt 9.0" in out
    assert main(["check", "--qemu-version", "11.1", "--libvirt-version", "11.3",
                 str(config)]) == 0
    assert "no longer accepts" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["libvirt", "qemu-argv", "check"])
@pytest.mark.parametrize(("option", "value", "message"), [
    ("--qemu-version", "12.0", "QEMU 12.0 is not a version ccidbridge knows "
                               "(it knows QEMU 5.2 to 11.1)"),
    ("--qemu-version", "7.5", "QEMU 7.5 is not a version ccidbridge knows"),
    ("--libvirt-version", "8.0", "libvirt 8.0 is not a version ccidbridge knows "
                                 "(it knows libvirt 9.0 to 12.8)"),
    ("--libvirt-version", "13.0", "libvirt 13.0 is not a version ccidbridge knows"),
    ("--libvirt-version", "eleven", "not a libvirt version: 'eleven'"),
])
def test_unknown_version_is_a_usage_error_naming_the_known_ones(
        tmp_path: Path, capsys, command: str, option: str, value: str, message: str) -> None:
    config = tmp_path / "vm.xml"
    config.write_text(RECONNECT)
    with pytest.raises(SystemExit) as exc:
        main([command, option, value, str(config)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_installed_version_outside_the_range_is_refused(tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    config = tmp_path / "vm.xml"
    config.write_text(RECONNECT)
    monkeypatch.setattr(installed, "qemu_version", lambda: QemuVersion(12, 0))
    assert main(["qemu-argv", str(config)]) == 2
    assert "the installed QEMU 12.0 is not a version ccidbridge knows" in capsys.readouterr().err
    assert main(["qemu-argv", "--qemu-version", "11.1", str(config)]) == 0


def test_defaults_are_the_installed_versions(tmp_path: Path, monkeypatch, capsys) -> None:
    config = tmp_path / "vm.xml"
    config.write_text(RECONNECT)
    monkeypatch.setattr(installed, "qemu_version", lambda: QemuVersion(10, 0))
    monkeypatch.setattr(installed, "libvirt_version", lambda: LibvirtVersion(9, 0))
    monkeypatch.setattr(installed, "usb_ccid_offers_t1", lambda: False)
    assert main(["qemu-argv", str(config)]) == 0
    assert "reconnect=5" in capsys.readouterr().out
    monkeypatch.setattr(installed, "libvirt_version", lambda: LibvirtVersion(11, 3))
    assert main(["qemu-argv", str(config)]) == 0
    assert "reconnect-ms=5000" in capsys.readouterr().out


def test_nothing_installed_means_the_newest_known(monkeypatch) -> None:
    monkeypatch.setattr(installed.shutil, "which", lambda _: None)
    assert installed.libvirt_version() == LibvirtVersion(12, 8)
    assert installed.qemu_version() == QemuVersion(11, 1)
    assert installed.usb_ccid_offers_t1() is False


@pytest.mark.parametrize("command", ["libvirt", "qemu-argv", "check"])
def test_help_names_the_versions_covered(capsys, command: str) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "QEMU 7.2, 10.0, 11.1 and libvirt 9.0, 11.3, 12.8" in out
    assert "--libvirt-version" in out


def test_t1_capable_usb_ccid_is_switched_off_in_argv_and_libvirt_xml() -> None:
    lay = layout(loads(RECONNECT).devices)
    plain = Target(QemuVersion(11, 1), LibvirtVersion(12, 8))
    t1 = Target(QemuVersion(11, 1), LibvirtVersion(12, 8), usb_ccid_t1=True)
    ccid = [json.loads(a) for a in argv(lay, t1) if a.startswith('{"driver":"usb-ccid"')]
    assert ccid == [{"driver": "usb-ccid", "id": "ccid0", "bus": "usb.0", "port": "1",
                     "x-t1-support": False}]
    assert "x-t1-support" not in " ".join(argv(lay, plain))
    xml = render_libvirt(lay, t1)
    assert "<qemu:property name='x-t1-support' type='bool' value='false'/>" in xml
    assert "<qemu:device alias='ccid0'>" in xml
    assert "x-t1-support" not in render_libvirt(lay, plain)


def test_no_released_qemu_has_the_t1_property(qemu_stack) -> None:  # noqa: ANN001
    """QEMU 7.2, 10.0 and 11.1 list usb-ccid's properties without x-t1-support; the
    probe reads the real list (``debug`` is in it) rather than assuming."""
    qemu_stack.enter()
    out = subprocess.run(qemu_stack.command(["qemu-system-x86_64", "-machine", "none",
                                             "-device", "usb-ccid,help"]),
                         capture_output=True, text=True, timeout=30).stdout
    props = installed.device_properties(out)
    assert "debug" in props and "msos-desc" in props
    assert installed.T1_PROPERTY not in props
    if qemu_stack.is_host:
        assert installed.usb_ccid_properties() == props
        assert installed.usb_ccid_offers_t1() is False


def test_the_probe_sees_the_property_when_qemu_lists_it() -> None:
    """A help line of the form QEMU prints, for the property QEMU's development tree adds
    (made up here: no release has it, docs/libvirt-facts.md#L33)."""
    text = ("usb-ccid options:\n  attached=<bool>\n  debug=<uint8>          -  (default: 0)\n"
            "  x-t1-support=<bool>    -  (default: true)\n")
    assert installed.T1_PROPERTY in installed.device_properties(text)


def test_the_probe_drives_the_default_output(tmp_path: Path, monkeypatch, capsys) -> None:
    """With no --qemu-version the installed QEMU is probed: offering x-t1-support switches
    it off in both outputs; a given --qemu-version is not the installed QEMU (no probe)."""
    config = tmp_path / "vm.xml"
    config.write_text(RECONNECT)
    monkeypatch.setattr(installed, "qemu_version", lambda: QemuVersion(11, 1))
    monkeypatch.setattr(installed, "libvirt_version", lambda: LibvirtVersion(12, 8))
    monkeypatch.setattr(installed, "usb_ccid_offers_t1", lambda: True)
    assert main(["qemu-argv", str(config)]) == 0
    assert '"x-t1-support":false' in capsys.readouterr().out
    assert main(["libvirt", str(config)]) == 0
    out = capsys.readouterr().out
    assert "<qemu:override" in out and "x-t1-support=off keeps the guest on T=0" in out
    assert main(["check", str(config)]) == 0
    assert "generated with x-t1-support=off" in capsys.readouterr().out
    assert main(["qemu-argv", "--qemu-version", "11.1", str(config)]) == 0
    assert "x-t1-support" not in capsys.readouterr().out
