"""``--qemu-version`` and ``--libvirt-version``: which QEMU + libvirt the output is for.

Shared by ``libvirt``, ``qemu-argv`` and ``check``.  Defaults: the installed
qemu-system-x86_64's and libvirtd's versions, else the newest known.  A version
outside the covered ranges is a usage error (exit 2) naming the ranges
(ccidbridge.config.versions).
"""

from __future__ import annotations

import argparse
import sys

from ccidbridge.config import installed
from ccidbridge.config.versions import (
    NEWEST,
    NEWEST_LIBVIRT,
    OLDEST_LIBVIRT,
    OLDEST_QEMU,
    LibvirtVersion,
    QemuVersion,
    Target,
    UnknownVersion,
    known_libvirt,
    known_qemu,
)

COVERED = (f"QEMU {OLDEST_QEMU} to {NEWEST} with libvirt {OLDEST_LIBVIRT} to {NEWEST_LIBVIRT}; "
           "tested against QEMU 7.2, 10.0, 11.1 and libvirt 9.0, 11.3, 12.8")


def _qemu(text: str) -> QemuVersion:
    try:
        return known_qemu(QemuVersion.parse(text))
    except UnknownVersion as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _libvirt(text: str) -> LibvirtVersion:
    try:
        return known_libvirt(LibvirtVersion.parse(text))
    except UnknownVersion as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_version_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--qemu-version", metavar="X.Y", type=_qemu, default=None,
        help=f"QEMU version to write for, {what} (default: the installed "
        f"qemu-system-x86_64's, else {NEWEST}; known: {OLDEST_QEMU} to {NEWEST})",
    )
    parser.add_argument(
        "--libvirt-version", metavar="X.Y", type=_libvirt, default=None,
        help="libvirt version to write for: libvirt before 10.9 prints reconnect=<s> even "
        f"for QEMU >= 9.2 (default: the installed libvirtd's, else {NEWEST_LIBVIRT}; known: "
        f"{OLDEST_LIBVIRT} to {NEWEST_LIBVIRT})",
    )


def target_of(args: argparse.Namespace) -> Target | None:
    """The Target the options (or the installed programs) name; None once an error about an
    installed version outside the covered ranges is printed."""
    try:
        qemu = args.qemu_version or known_qemu(installed.qemu_version())
        libvirt = args.libvirt_version or known_libvirt(installed.libvirt_version())
    except UnknownVersion as exc:
        print(f"ccidbridge: the installed {exc}; pass --qemu-version/--libvirt-version",
              file=sys.stderr)
        return None
    t1 = args.qemu_version is None and installed.usb_ccid_offers_t1()
    return Target(qemu, libvirt, usb_ccid_t1=t1)
