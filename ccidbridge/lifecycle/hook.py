"""libvirt's qemu hook: start the bridge when a domain with our metadata starts,
stop it when the domain stops (how libvirt calls hooks: docs/lifecycle.md#H6).

libvirt runs ``/etc/libvirt/hooks/qemu.d/*`` with ``DOMAIN OPERATION
SUB-OPERATION EXTRA`` and the domain XML on stdin, and waits for the hook
to exit (and for its stdout/stderr to close) before it goes on; for
``prepare`` a non-zero exit aborts the start with the hook's stderr as the
error.  So the hook never waits for the bridge: it starts a systemd instance
(``--no-block``) or a detached process (own session, stdio on a log file)
and returns.

Rules (stated here once, applied in :func:`decide`):

* H-start: a config where the bridge listens for any card (``mode='connect'``:
  QEMU dials the bridge) starts at ``prepare``, before QEMU exists, and the hook
  waits a bounded moment until the bridge listens (QEMU gives up at once on a
  refused connect without ``reconnect``); otherwise at ``started``, when QEMU
  listens (the bridge connects, and retries anyway).
* H-stop: ``stopped`` and ``release`` stop it (``release`` also covers a
  start that failed after ``prepare``).  Stopping twice is harmless.
* Every other operation (migrate, restore, reconnect, attach ...) does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The default config directory of the systemd template unit (one instance per file).
CONFIG_DIR = "/etc/ccidbridge"
DEFAULT_STATE_DIR = "/run/ccidbridge"
DEFAULT_LOG_DIR = "/var/log/ccidbridge"
#: How long ``prepare`` waits for a listening bridge (it is up in ~0.3 s).
LISTEN_WAIT = 5.0
#: How long a start waits for the previous bridge of the same domain to exit.
OLD_BRIDGE_WAIT = 3.0


@dataclass(frozen=True)
class Action:
    start: bool = False
    stop: bool = False
    wait_listening: bool = False


def decide(operation: str, sub_operation: str, bridge_listens: bool) -> Action:
    """What the hook does for one call (rules H-start, H-stop)."""
    if operation == "prepare" and sub_operation == "begin" and bridge_listens:
        return Action(start=True, wait_listening=True)
    if operation == "started" and sub_operation == "begin" and not bridge_listens:
        return Action(start=True)
    if operation in ("stopped", "release") and sub_operation == "end":
        return Action(stop=True)
    return Action()


def systemd_instance(config_path: str) -> str | None:
    """``NAME`` for ``/etc/ccidbridge/NAME.xml`` (the template unit's instances)."""
    path = Path(config_path)
    if str(path.parent) != CONFIG_DIR or path.suffix != ".xml" or not path.stem:
        return None
    if not all(c.isalnum() or c in "-_." for c in path.stem):
        return None  # would need systemd-escape; run it detached instead
    return path.stem


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 here."""
    return os.path.isdir("/run/systemd/system")


@dataclass
class Places:
    state_dir: Path
    log_dir: Path

    def pid_file(self, domain: str) -> Path:
        return self.state_dir / f"{_safe(domain)}.pid"

    def log_file(self, domain: str) -> Path:
        return self.log_dir / f"{_safe(domain)}.log"

    def note(self, line: str) -> None:
        """One line to the hook's own log (and stderr, which libvirt logs)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"ccidbridge hook: {line}", file=sys.stderr)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / "hook.log", "a", encoding="utf-8") as f:
                f.write(f"{stamp} {line}\n")
        except OSError:
            pass


def _safe(domain: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in domain)


def bridge_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is a ccidbridge still running."""
    try:
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"ccidbridge" in f.read() else None
    except (OSError, ValueError):
        return None


def start_detached(domain: str, config_path: str, places: Places) -> int:
    """``ccidbridge run CONFIG`` in its own session, stdio on the log file; returns its pid."""
    pid_file = places.pid_file(domain)
    old = bridge_pid(pid_file)
    deadline = time.monotonic() + OLD_BRIDGE_WAIT
    while old is not None and bridge_pid(pid_file) is not None:
        if time.monotonic() > deadline:  # a previous run's bridge will not go
            os.kill(old, signal.SIGKILL)
            break
        time.sleep(0.05)
    places.state_dir.mkdir(parents=True, exist_ok=True)
    places.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = places.log_file(domain)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccidbridge", "run", config_path],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd="/",
        )
    tmp = pid_file.with_suffix(".pid.tmp")
    tmp.write_text(f"{proc.pid}\n")
    tmp.rename(pid_file)
    return proc.pid


def stop_detached(domain: str, places: Places) -> int | None:
    """SIGTERM the domain's detached bridge (the bridge says goodbye by itself)."""
    pid_file = places.pid_file(domain)
    pid = bridge_pid(pid_file)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return pid


def systemctl(verb: str, unit: str) -> str | None:
    """``systemctl --no-block VERB UNIT``; the error text, or None."""
    proc = subprocess.run(["systemctl", "--no-block", verb, unit], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=10)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")
