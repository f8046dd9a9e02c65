"""The QEMU and libvirt versions the renderers write for (docs/libvirt-facts.md#L30).

Pure.  libvirt's output for a device depends on both: on QEMU's through the
capabilities libvirt probes (JSON ``-device`` from QEMU 7.0, JSON ``-object``
from 6.0, ``reconnect-ms`` from 9.2), and on libvirt's own, because a libvirt
only uses what it knows: libvirt 9.0 prints ``reconnect=<s>`` even for QEMU 10
(docs/libvirt-facts.md#L31).  A :class:`Target` is the pair; ``--qemu-version`` and
``--libvirt-version`` pick it, defaulting to what is installed.

Only versions inside the covered ranges are accepted: outside them libvirt's
output has not been compared with ccidbridge's, so a version there gets an
error naming the ranges (never a guess).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class UnknownVersion(ValueError):
    """A version that is not X.Y, or not one ccidbridge's renderers cover."""


def _parse(kind: str, text: str) -> tuple[int, int]:
    match = re.search(r"(\d+)\.(\d+)", text)
    if not match:
        raise UnknownVersion(
            f"not a {kind} version: {text!r} (expected X.Y, e.g. {_EXAMPLE[kind]})")
    return int(match.group(1)), int(match.group(2))


_EXAMPLE = {"QEMU": "7.2", "libvirt": "9.0"}


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        """``7.2``, ``7.2.22`` or ``QEMU emulator version 7.2.22 (...)``."""
        return cls(*_parse("QEMU", text))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def json_device(self) -> bool:
        return self >= QemuVersion(7, 0)

    @property
    def json_object(self) -> bool:
        return self >= QemuVersion(6, 0)

    @property
    def has_reconnect_ms(self) -> bool:
        """QEMU 9.2 added ``reconnect-ms`` and deprecated ``reconnect``
        (docs/libvirt-facts.md#L31)."""
        return self >= QemuVersion(9, 2)

    @property
    def refuses_reconnect(self) -> bool:
        """QEMU removed the deprecated ``reconnect`` in 10.2: 11.1 refuses it ("Invalid
        parameter 'reconnect'", docs/libvirt-facts.md#L31)."""
        return self >= QemuVersion(10, 2)

    @property
    def reconnect_ms(self) -> bool:
        """Whether the newest libvirt prints ``reconnect-ms`` for this QEMU."""
        return Target(self, NEWEST_LIBVIRT).reconnect_ms

    @property
    def usb_ccid_t1(self) -> bool:
        """No QEMU release up to 11.1 has usb-ccid's ``x-t1-support``
        (docs/libvirt-facts.md#L33)."""
        return False


@dataclass(frozen=True, order=True)
class LibvirtVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> LibvirtVersion:
        """``9.0``, ``9.0.0`` or ``libvirtd (libvirt) 9.0.0``."""
        return cls(*_parse("libvirt", text))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


#: The ranges whose output the oracle suite compares (docs/libvirt-facts.md#L30).
OLDEST_QEMU = QemuVersion(5, 2)
NEWEST = QemuVersion(11, 1)  # the default when no qemu-system-x86_64 is installed
OLDEST_LIBVIRT = LibvirtVersion(9, 0)
NEWEST_LIBVIRT = LibvirtVersion(12, 8)  # the default when no libvirtd is installed
#: From this libvirt on (seen in 11.3, not in 9.0; the release in between that changed it
#: is not pinned down) an implicit ccid controller is inserted in index order, so it
#: takes its USB port before the higher-indexed controllers the config lists
#: (docs/libvirt-facts.md#L32); 9.0 appends it after them.
SORTED_CCID_LIBVIRT = LibvirtVersion(11, 3)
#: The usb-ccid property that lets a guest negotiate T=1 (docs/libvirt-facts.md#L33).
T1_PROPERTY = "x-t1-support"
#: The first libvirt release that knows QEMU's ``reconnect-ms`` (capability
#: chardev-reconnect-miliseconds, docs/libvirt-facts.md#L31): 10.9 or 10.10 by where the
#: capability sits in libvirt's list; we take 10.9 (9.0 and 11.3 are what the oracle runs).
RECONNECT_MS_LIBVIRT = LibvirtVersion(10, 9)


def known_qemu(version: QemuVersion) -> QemuVersion:
    """``version`` if the renderers cover it, else UnknownVersion naming the range."""
    if not OLDEST_QEMU <= version <= NEWEST or version.minor > 2:
        raise UnknownVersion(f"QEMU {version} is not a version ccidbridge knows "
                             f"(it knows QEMU {OLDEST_QEMU} to {NEWEST})")
    return version


def known_libvirt(version: LibvirtVersion) -> LibvirtVersion:
    """``version`` if the renderers cover it, else UnknownVersion naming the range."""
    if not OLDEST_LIBVIRT <= version <= NEWEST_LIBVIRT or version.minor > 10:
        raise UnknownVersion(f"libvirt {version} is not a version ccidbridge knows "
                             f"(it knows libvirt {OLDEST_LIBVIRT} to {NEWEST_LIBVIRT})")
    return version


@dataclass(frozen=True)
class Target:
    """What to write for: this QEMU driven by this libvirt."""

    qemu: QemuVersion
    libvirt: LibvirtVersion = NEWEST_LIBVIRT
    #: The QEMU's usb-ccid offers ``x-t1-support`` (probed with ``-device usb-ccid,help``,
    #: never inferred from a version): the output then switches it off, so the guest
    #: stays on T=0, the only protocol the bridge relays (docs/libvirt-facts.md#L33).
    usb_ccid_t1: bool = False

    def __str__(self) -> str:
        return f"QEMU {self.qemu} with libvirt {self.libvirt}"

    @property
    def json_device(self) -> bool:
        return self.qemu.json_device

    @property
    def json_object(self) -> bool:
        return self.qemu.json_object

    @property
    def reconnect_ms(self) -> bool:
        """``reconnect-ms=<ms>`` rather than ``reconnect=<s>`` (docs/libvirt-facts.md#L31)."""
        return self.qemu.has_reconnect_ms and self.libvirt >= RECONNECT_MS_LIBVIRT

    @property
    def reconnect_broken(self) -> bool:
        """This libvirt prints ``reconnect=<s>`` and this QEMU refuses it: a domain with
        ``<reconnect>`` does not start (docs/libvirt-facts.md#L31)."""
        return not self.reconnect_ms and self.qemu.refuses_reconnect


#: What the renderers take: a Target, or a QemuVersion (meaning: with the newest libvirt).
Versions = Target | QemuVersion
