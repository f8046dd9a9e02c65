"""What is installed on this machine (the only IO the generators depend on)."""

from __future__ import annotations

import shutil
import subprocess

from ccidbridge.config.versions import (
    NEWEST,
    NEWEST_LIBVIRT,
    T1_PROPERTY,
    LibvirtVersion,
    QemuVersion,
)


def _version_output(binary: str) -> str | None:
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def qemu_version(binary: str = "qemu-system-x86_64") -> QemuVersion:
    """The installed QEMU's version, else the newest one ccidbridge knows."""
    out = _version_output(binary)
    try:
        return QemuVersion.parse(out) if out else NEWEST
    except ValueError:
        return NEWEST


def libvirt_version(binary: str = "libvirtd") -> LibvirtVersion:
    """The installed libvirtd's version (``libvirtd (libvirt) 9.0.0``), else the newest known."""
    out = _version_output(binary)
    try:
        return LibvirtVersion.parse(out) if out else NEWEST_LIBVIRT
    except ValueError:
        return NEWEST_LIBVIRT


def device_properties(help_text: str) -> set[str]:
    """The property names in ``-device DRIVER,help`` output (``  name=<type> ...`` lines)."""
    return {line.split("=", 1)[0].strip() for line in help_text.splitlines()
            if line.startswith("  ") and "=" in line}


def usb_ccid_properties(binary: str = "qemu-system-x86_64") -> set[str]:
    """The installed QEMU's usb-ccid properties, from ``-device usb-ccid,help``."""
    path = shutil.which(binary)
    if path is None:
        return set()
    try:
        out = subprocess.run([path, "-machine", "none", "-device", "usb-ccid,help"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return set()
    return device_properties(out.stdout)


def usb_ccid_offers_t1(binary: str = "qemu-system-x86_64") -> bool:
    """Does the installed QEMU's usb-ccid have the ``x-t1-support`` property?

    Probed (docs/libvirt-facts.md#L33): QEMU's development tree adds it, no release up
    to 11.1 has it, so a version number cannot tell.
    """
    return T1_PROPERTY in usb_ccid_properties(binary)
