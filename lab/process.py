"""Stopping the lab's child processes: by PID, always reaped.

Reaping matters here: inside ``.ci/isolated`` nothing else collects our
zombies promptly (docs/lab.md#V10).
"""

from __future__ import annotations

import signal
import subprocess


def reap(
    proc: subprocess.Popen | None,
    sig: int = signal.SIGTERM,
    timeout: float = 5.0,
    *,
    cont: bool = False,
) -> int | None:
    """Send ``sig`` to ``proc`` if it still runs, wait for it (SIGKILL after
    ``timeout``) and return its exit status.  ``cont`` sends SIGCONT first,
    so a SIGSTOPped process can act on ``sig``."""
    if proc is None:
        return None
    if proc.poll() is None:
        if cont:
            proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode
