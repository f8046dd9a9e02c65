"""pytest fixtures for the real-guest tests (``guest`` marker).

- ``guest_image``: the guest, built once per session into the cache
  (``$CCIDBRIDGE_GUEST_CACHE`` or ``<repo>/.cache/guest``).
- ``boot_guest``: ``boot_guest(device_args, steps=..., timeout=..., **kw) -> GuestRun``.
- ``start_guest``: the same but returns a running :class:`GuestHandle`;
  every handle still running at teardown is killed.
- ``middleware_image``: the guest with OpenSC and GnuPG (lab/guest/middleware.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence

import pytest

from lab.guest import GuestHandle, GuestImage, GuestRun, build_guest
from lab.guest import boot as guest_boot
from lab.guest.middleware import build_middleware_guest
from tests.fixtures_stack import missing


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Build (or reuse) the guest image (a missing QEMU fails under make test)."""
    if shutil.which(guest_boot.QEMU) is None:
        missing(f"{guest_boot.QEMU} not installed (Debian package qemu-system-x86)")
    return build_guest()


@pytest.fixture
def start_guest(guest_image: GuestImage) -> Iterator[Callable[..., GuestHandle]]:
    """``start_guest(device_args, steps, timeout, **kw)``; all killed at teardown."""
    handles: list[GuestHandle] = []

    def start(device_args: Sequence[str], steps: str | None = None, timeout: float = 45.0,
              **kwargs: object) -> GuestHandle:
        handle = guest_boot.start_guest(guest_image, device_args, steps, timeout,
                                        **kwargs)  # type: ignore[arg-type]
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.kill()


@pytest.fixture
def boot_guest(start_guest: Callable[..., GuestHandle]) -> Callable[..., GuestRun]:
    """Run a guest to the end: ``boot_guest(device_args, steps, timeout, **kw) -> GuestRun``."""

    def boot(device_args: Sequence[str], steps: str | None = None, timeout: float = 45.0,
             **kwargs: object) -> GuestRun:
        return start_guest(device_args, steps, timeout, **kwargs).result()

    return boot


@pytest.fixture(scope="session")
def middleware_image(guest_image: GuestImage) -> GuestImage:
    """The middleware guest (OpenSC + GnuPG, lab/guest/middleware.py), built once."""
    del guest_image  # built first: the middleware image extends it
    return build_middleware_guest()
