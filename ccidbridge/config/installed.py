"""What is installed on this machine (the only IO the generators depend on)."""

from __future__ import annotations

import shutil
import subprocess

from ccidbridge.config.qemu_argv import NEWEST, QemuVersion


def qemu_version(binary: str = "qemu-system-x86_64") -> QemuVersion:
    """The installed QEMU's version, else the newest one ccidbridge knows."""
    path = shutil.which(binary)
    if path is None:
        return NEWEST
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        return QemuVersion.parse(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return NEWEST
