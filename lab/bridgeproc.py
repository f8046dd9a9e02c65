"""``ccidbridge run`` as a real process, for the demo, guest tests and benchmarks.

Also writes the one-card config they share and turns it into QEMU arguments
exactly as ``ccidbridge qemu-argv`` does.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

from ccidbridge.config import Config, load, loads
from ccidbridge.config.installed import qemu_version
from ccidbridge.config.layout import layout
from ccidbridge.config.qemu_argv import render


def write_config(path: Path, socket_path: Path, reader: str, **reader_attrs: str) -> Path:
    """A config with one passthrough card on a Unix socket QEMU listens on
    (``mode='bind'``: the bridge connects, and retries until QEMU is up)."""
    attrs = "".join(f" {k.replace('_', '-')}={quoteattr(v)}" for k, v in reader_attrs.items())
    path.write_text(
        "<ccidbridge>\n"
        "  <smartcard mode='passthrough' type='unix'>\n"
        f"    <source mode='bind' path={quoteattr(str(socket_path))}/>\n"
        "    <address type='ccid' controller='0' slot='0'/>\n"
        f"    <reader name={quoteattr(reader)}{attrs}/>\n"
        "  </smartcard>\n"
        "</ccidbridge>\n"
    )
    return path


def device_args(config: Path | Config, add_usb: bool = True) -> list[str]:
    """What ``ccidbridge qemu-argv [--usb] CONFIG`` prints, as an argument list."""
    if not isinstance(config, Config):
        config = load(str(config))
    return shlex.split(render(layout(config.devices), qemu_version(), add_usb=add_usb))


def socket_device_args(socket_path: str, add_usb: bool = False) -> list[str]:
    """The reader of a one-card config whose Unix socket QEMU listens on, for
    tests that put their own VSCard peer there instead of the bridge."""
    config = loads(
        "<ccidbridge><smartcard mode='passthrough' type='unix'>"
        f"<source mode='bind' path={quoteattr(socket_path)}/></smartcard></ccidbridge>"
    )
    return device_args(config, add_usb)


class BridgeProcess:
    """``python -m ccidbridge run CONFIG``; its log goes to a file."""

    def __init__(self, config: Path, log_path: Path, verbose: int = 1) -> None:
        self.config = config
        self.log_path = log_path
        flags = ["-" + "v" * verbose] if verbose else []
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ccidbridge", "run", *flags, str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first log line (from character ``after`` on) containing ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()[after:]
            for line in text.splitlines():
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise TimeoutError(f"bridge log has no {needle!r}:\n{self.text()[-3000:]}")

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop by PID (SIGTERM: the bridge says goodbye to QEMU first)."""
        self.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(timeout)

    def __enter__(self) -> BridgeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
        elif not self._log.closed:
            self._log.close()
