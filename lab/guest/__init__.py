"""A tiny real Linux guest for end-to-end tests: Debian's kernel, busybox,
pcscd + libccid and a small PC/SC client (``client.c``) in an initramfs.

``build_guest`` builds (or reuses) the image, ``boot_guest``/``start_guest``
run it under QEMU and parse the client's ``CCIDT ...`` console lines.
"""

from lab.guest.boot import (
    ApduExchange,
    GuestError,
    GuestHandle,
    GuestRun,
    GuestTimeout,
    Record,
    StateEvent,
    boot_guest,
    kernel_append,
    qemu_argv,
    start_guest,
)
from lab.guest.build import GuestBuildError, GuestImage, build_guest, default_cache_dir

__all__ = [
    "ApduExchange",
    "GuestBuildError",
    "GuestError",
    "GuestHandle",
    "GuestImage",
    "GuestRun",
    "GuestTimeout",
    "Record",
    "StateEvent",
    "boot_guest",
    "build_guest",
    "default_cache_dir",
    "kernel_append",
    "qemu_argv",
    "start_guest",
]
