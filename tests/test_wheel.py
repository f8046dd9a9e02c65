"""The wheel holds the bridge only, and the bridge works from it alone.

Builds the wheel from a copy of the source tree, lists it, installs it into a
fresh venv (no access to the source tree, no network: the build backend and
the dependencies come from the wheelhouse ``make setup`` fills, see
lab/wheelhouse.py) and runs every command from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lab import ROOT
from lab.examples_regen import EXAMPLES, configs, generated

WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
#: What ccidbridge/ in the wheel may hold: the bridge, nothing of the lab.
PACKAGE = {"__init__.py", "__main__.py", "cli.py", "spec.py", "tls.py",
           "protocol", "runtime", "card", "config", "commands", "lifecycle"}
COMMANDS = ("run", "readers", "check", "libvirt", "qemu-argv", "attach", "detach", "doctor",
            "hook", "install-hook", "install-unit")
#: Not part of the source tree a wheel is built from.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "*.egg-info",
                                     "__pycache__", ".*_cache", ".hypothesis", "results")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (WHEELHOUSE / ".complete").exists():
        pytest.fail(f"{WHEELHOUSE} is missing: `make setup` (make wheelhouse) fills it",
                    pytrace=False)
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    out = work / "dist"
    done = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                "--find-links", WHEELHOUSE, "-w", out, src, cwd=work)
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("ccidbridge-*.whl")
    assert "BuildBackendWarning" not in done.stderr, done.stderr  # e.g. the license table
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path) -> Path:
    """A fresh venv with the wheel and its dependencies, nothing else of the project."""
    where = wheel.parent.parent / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    made = _run(base, "-m", "venv", where, cwd=wheel.parent)
    assert made.returncode == 0, made.stderr
    done = _run(where / "bin" / "python", "-m", "pip", "install", "-q", "--no-index",
                "--find-links", WHEELHOUSE, wheel, cwd=wheel.parent)
    assert done.returncode == 0, done.stderr
    return where


def test_wheel_holds_the_bridge_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert len(dist_info) == 1, dist_info
    (meta,) = dist_info
    package = [n for n in names if not n.startswith(f"{meta}/")]
    assert all(n.startswith("ccidbridge/") for n in package), package
    top = {n.split("/")[1] for n in package}
    assert top == PACKAGE, top ^ PACKAGE
    assert "ccidbridge/config/schema.rng" in package
    assert "ccidbridge/lifecycle/data/ccidbridge@.service.in" in package  # install-unit
    assert "ccidbridge/lifecycle/data/qemu-hook.in" in package  # install-hook
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "ccidbridge").rglob("*.py")}
    assert {n for n in package if n.endswith(".py")} == source
    for lab_part in ("lab", "twin", "demo", "examples_regen", "vpcd_card", "guest"):
        assert not [n for n in package if lab_part in n], lab_part


def test_installed_commands_run_alone(venv: Path, tmp_path: Path) -> None:
    """From a directory without the source tree: every --help, check, libvirt, qemu-argv."""
    exe = venv / "bin" / "ccidbridge"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run(venv / "bin" / "python", "-c", "import ccidbridge; print(ccidbridge.__file__)",
                 cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(venv)), where
    lab = _run(venv / "bin" / "python", "-c", "import lab", cwd=tmp_path, env=env)
    assert "No module named 'lab'" in lab.stderr
    top = _run(exe, "--help", cwd=tmp_path, env=env)
    assert top.returncode == 0, top.stderr
    for command in COMMANDS:
        assert command in top.stdout
        done = _run(exe, command, "--help", cwd=tmp_path, env=env)
        assert done.returncode == 0 and f"usage: ccidbridge {command}" in done.stdout, done
    for config in configs():
        check = _run(exe, "check", config, cwd=tmp_path, env=env)
        assert check.returncode == 0 and f"{config}: valid" in check.stdout, check
        expected = {p.suffix: text for p, text in generated(config).items()}
        libvirt = _run(exe, "libvirt", "--qemu-version", "7.2", config, cwd=tmp_path, env=env)
        assert (libvirt.returncode, libvirt.stdout) == (0, expected[".xml"]), libvirt.stderr
        argv = _run(exe, "qemu-argv", "--qemu-version", "7.2", config, cwd=tmp_path, env=env)
        assert (argv.returncode, argv.stdout) == (0, expected[".argv"]), argv.stderr
    units = tmp_path / "units"
    unit = _run(exe, "install-unit", "--dir", units, cwd=tmp_path, env=env)
    assert unit.returncode == 0, unit.stderr
    assert f"ExecStart={venv}/bin/python" in (units / "ccidbridge@.service").read_text()
    bad = tmp_path / "bad.xml"
    bad.write_text("<ccidbridge>\n<smartcard/>\n</ccidbridge>\n")
    refused = _run(exe, "check", bad, cwd=tmp_path, env=env)
    assert refused.returncode == 2 and refused.stderr.startswith(f"{bad}:2: "), refused
    assert (EXAMPLES / "tcp-bind.xml") in configs()
