"""`make demo` is the README's main command: run it as `make demo` does."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.guest, pytest.mark.stack]


def test_demo_runs_end_to_end_and_the_guest_matches_the_host(pcsc_stack, guest_image) -> None:
    pcsc_stack.stop()  # the demo starts its own pcscd, and there is room for one
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lab.demo"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        pcsc_stack.start()
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "5/5 answers identical" in out
    assert "ccidbridge libvirt" in out and "qemu-argv" in out
    bridge_log = out.split("bridge log:")[1].split("== 4.")[0]
    assert "INS 20" in bridge_log and "31323334" not in bridge_log  # VERIFY seen, PIN not
    assert "Traceback" not in out + proc.stderr
