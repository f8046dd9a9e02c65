"""Helpers for the lifecycle tests: ccidbridge sub-commands as real processes, and
a libvirt domain running the lab guest whose reader comes and goes (lab/vm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import child_env
from lab.libvirtd import URI, Libvirtd
from lab.vm import Console, cycling_initrd, domain_xml
from lab.vpcd_card import ATR_PRESETS


class CliProcess:
    """``python -m ccidbridge ARGS`` running in the background, its output in a file."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ccidbridge", *args], stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env({"PYTHONUNBUFFERED": "1"}))

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.text().splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} in the output:\n{self.text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m ccidbridge ARGS`` to the end."""
    return subprocess.run([sys.executable, "-m", "ccidbridge", *args], capture_output=True,
                          text=True, env=child_env(), timeout=120, stdin=subprocess.DEVNULL)


def qmp(libvirtd: Libvirtd, domain: str, command: str, **arguments: object) -> object:
    req: dict[str, object] = {"execute": command}
    if arguments:
        req["arguments"] = arguments
    out = libvirtd.virsh("qemu-monitor-command", domain, json.dumps(req))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["return"]


def ours_in_qemu(libvirtd: Libvirtd, domain: str) -> list[str]:
    """Every device id and chardev of ccidbridge's QEMU still has."""
    devices = [c["name"] for c in qmp(libvirtd, domain, "qom-list", path="/machine/peripheral")]
    chardevs = [c["label"] for c in qmp(libvirtd, domain, "query-chardev")]
    return sorted(n for n in devices + chardevs if n.startswith("ccidbridge-"))


def info_usb(libvirtd: Libvirtd, domain: str) -> str:
    return str(qmp(libvirtd, domain, "human-monitor-command", **{"command-line": "info usb"}))


def guest_reads_the_card(console: Console, cycle: int, expected: list[bytes]) -> None:
    """The guest's reader arrives (``cycle``-th time), its client reads our "dual" card
    and gets ``expected``, the host's own answers."""
    console.wait_for(f"init usb-ready n={cycle}", 60)
    start = len(console.records)
    console.wait_for(f"init client-exit n={cycle}", 60)
    run = console.run_since(start)
    assert run.client_rc == 0, console.tail()
    assert run.atr == ATR_PRESETS["dual"]
    assert [x.response for x in run.apdus] == expected


def attach_args(domain: str, config: Path) -> list[str]:
    return ["attach", "-v", "-c", URI, domain, str(config)]


@pytest.fixture
def guest_vm(
    libvirtd: Libvirtd, guest_image: object, tmp_path: Path
) -> Iterator[Callable[..., tuple[str, Console]]]:
    """Factory: ``guest_vm(steps, cycles=9, usb='qemu-xhci') -> (name, console)``, a
    running transient domain; every one destroyed at teardown."""
    made: list[str] = []

    def start(steps: str = "wait-card", cycles: int = 9, usb: str = "qemu-xhci",
              metadata: str = "", define_only: bool = False) -> tuple[str, Console]:
        name = f"ccidbridge-life-{os.getpid()}-{len(made)}"
        work = tmp_path / name
        work.mkdir()
        initrd = cycling_initrd(guest_image, work, {"steps": steps})  # type: ignore[arg-type]
        console = work / "console.log"
        xml = work / "domain.xml"
        xml.write_text(domain_xml(name, guest_image, initrd, console, cycles=cycles, usb=usb,
                                  metadata=metadata))
        made.append(name)
        verb = ("define",) if define_only else ("create",)
        out = libvirtd.virsh(*verb, str(xml))
        assert out.returncode == 0, out.stderr + libvirtd.qemu_log(name)
        return name, Console(console)

    yield start
    for name in made:
        libvirtd.destroy(name)
        libvirtd.virsh("undefine", name)
