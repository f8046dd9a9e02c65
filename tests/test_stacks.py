"""The stacks themselves (lab.stacks): the roots hold the versions they claim, their
programs run chrooted in the namespace with /tmp shared, and a root that is missing or
failed to build is reported in one line naming the stack and why."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab import stacks
from lab.stacks import ROOTED, Stack, StackError
from tests.fixtures_libvirt import require_stack


@pytest.mark.parametrize("stack", ROOTED, ids=str)
def test_the_root_holds_the_versions_it_claims(stack: Stack) -> None:
    require_stack(stack)
    versions = subprocess.run(
        ["chroot", str(stack.root), "dpkg-query", "-W", "-f", "${Package} ${Version}\n",
         "qemu-system-x86", "libvirt-daemon", "pcscd"],
        capture_output=True, text=True, check=True).stdout
    got = dict(line.split(" ", 1) for line in versions.splitlines())
    assert got["qemu-system-x86"].split(":")[-1].startswith(stack.qemu + ".")
    assert got["libvirt-daemon"].startswith(stack.libvirt + ".")
    assert got["pcscd"].startswith(stack.pcsclite + ".")


@pytest.mark.parametrize("stack", ROOTED, ids=str)
def test_chrooted_programs_share_tmp_and_get_a_private_run(stack: Stack,
                                                           tmp_path: Path) -> None:
    require_stack(stack)
    stack.enter()
    (tmp_path / "hello").write_text("from the host")
    seen = subprocess.run(stack.command(["cat", str(tmp_path / "hello")]),
                          capture_output=True, text=True, check=True).stdout
    assert seen == "from the host"
    with open("/proc/self/mounts", encoding="utf-8") as f:
        mounts = {line.split()[1]: line.split()[0] for line in f}
    assert mounts[str(stack.path("/run"))] == "ccidbridge-stack"
    assert mounts[str(stack.path("/var/lib/libvirt"))] == "ccidbridge-stack"
    wrapper = stack.executable("qemu-system-x86_64")
    out = subprocess.run([wrapper, "--version"], capture_output=True, text=True).stdout
    assert f"version {stack.qemu}." in out


def test_a_missing_root_is_one_line_naming_the_stack(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stacks, "ROOTS", tmp_path)
    stack = Stack("forky", "Debian 14", "forky", qemu="11.1", libvirt="12.8", pcsclite="2.5")
    problem = stack.problem()
    assert problem is not None and len(problem.splitlines()) == 1
    assert problem.startswith("stack forky (Debian 14): no root at ")
    assert "make setup" in problem
    with pytest.raises(StackError, match="stack forky"):
        stack.enter()


def test_a_failed_build_is_one_line_with_the_reason(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stacks, "ROOTS", tmp_path)
    stack = Stack("forky", "Debian 14", "forky", qemu="11.1", libvirt="12.8", pcsclite="2.5")
    (tmp_path / "forky.failed").write_text(
        "E: Unable to locate package qemu-system-x86\nmore detail\n")
    assert stack.problem() == ("stack forky (Debian 14): root build failed: "
                               "E: Unable to locate package qemu-system-x86")


def test_a_stale_root_is_reported(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stacks, "ROOTS", tmp_path)
    stack = Stack("forky", "Debian 14", "forky", qemu="11.1", libvirt="12.8", pcsclite="2.5")
    stack.root.mkdir()
    (stack.root / stacks.STAMP).write_text("forky 0000\n")
    assert "is stale" in (stack.problem() or "")
    (stack.root / stacks.STAMP).write_text(stacks.stamp_text(stack))
    assert stack.problem() is None


@pytest.mark.parametrize(("log", "reason"), [
    ("I: Retrieving InRelease\nW: Failure trying to run: chroot x mount -t proc\n"
     "E: Unable to locate package qemu-system-x86\n", "E: Unable to locate package"),
    ("W: Failed to fetch http://deb.debian.org/debian/dists/sid/InRelease  "
     "Temporary failure resolving 'deb.debian.org'\n", "Temporary failure resolving"),
    ("", "no output"),
])
def test_the_build_failure_reason_is_the_telling_line(log: str, reason: str) -> None:
    assert reason in stacks._reason(log)


def test_no_root_is_built_inside_the_namespace(monkeypatch) -> None:
    """The namespace has no network: a build there would fail late and confusingly."""
    monkeypatch.setenv("CCIDBRIDGE_ISOLATED", "1")
    with pytest.raises(StackError, match="outside .ci/isolated"):
        stacks.build(stacks.SID)
