"""The systemd template unit ``ccidbridge@.service`` as ``install-unit`` writes it,
checked by systemd's own ``systemd-analyze verify`` (no running systemd needed)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_stack import missing
from tests.lifecycle_helpers import cli


def _verify(unit_dir: Path, instance: str = "vm1") -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        missing("systemd-analyze not installed (Debian package systemd)")
    return subprocess.run(["systemd-analyze", "verify", f"./ccidbridge@{instance}.service"],
                          cwd=unit_dir, capture_output=True, text=True, timeout=60)


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    out = cli("install-unit", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "systemctl enable --now ccidbridge@NAME" in out.stdout
    return tmp_path / "ccidbridge@.service"


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(installed: Path) -> None:
    out = _verify(installed.parent)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "" and out.stdout.strip() == ""


def test_verify_does_catch_a_broken_unit(installed: Path, tmp_path: Path) -> None:
    """The control for the test above: verify reports what it cannot parse."""
    broken = tmp_path / "broken"
    broken.mkdir()
    text = installed.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus")
    (broken / "ccidbridge@.service").write_text(text)
    out = _verify(broken)
    assert "Failed to parse protect system value" in out.stderr


def test_the_unit_is_hardened_restarts_on_failure_and_runs_this_installation(
    installed: Path,
) -> None:
    service = _unit(installed)["Service"]
    assert service["ExecStart"] == f"{sys.executable} -m ccidbridge run /etc/ccidbridge/%i.xml"
    assert service["Restart"] == "on-failure"
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "ProtectHome": "yes", "PrivateDevices": "yes", "ReadWritePaths": "/run/ccidbridge",
        "RuntimeDirectory": "ccidbridge", "CapabilityBoundingSet": "", "UMask": "0077",
    }.items():
        assert service[key] == value, key
    assert "User" not in service


def test_user_option_sets_user_and_group(tmp_path: Path) -> None:
    out = cli("install-unit", "--dir", str(tmp_path), "--user", "ccidbridge")
    assert out.returncode == 0, out.stderr
    service = _unit(tmp_path / "ccidbridge@.service")["Service"]
    assert service["User"] == service["Group"] == "ccidbridge"
    assert _verify(tmp_path).returncode == 0
