"""``python -m lab.guest [CACHE_DIR]``: build (or reuse) the test guests (the
minimal one and the middleware one, lab/guest/middleware.py).

Run it *outside* ``.ci/isolated``: the private namespace has no network, and
the first build downloads the kernel package with apt-get.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lab.guest.build import GuestBuildError, build_guest, default_cache_dir
from lab.guest.middleware import build_middleware_guest


def main(argv: list[str]) -> int:
    """Build, print the image's paths and the time it took."""
    cache = Path(argv[0]) if argv else default_cache_dir()
    started = time.monotonic()
    try:
        image = build_guest(cache)
        middleware = build_middleware_guest(cache)
    except GuestBuildError as exc:
        print(f"guest build failed: {exc}", file=sys.stderr)
        return 1
    state = "cached" if image.cached else "built"
    print(f"guest {state} in {time.monotonic() - started:.2f} s: kernel {image.kernel_version}")
    print(f"  vmlinux {image.vmlinux}")
    print(f"  initrd  {image.initrd}")
    state = "cached" if middleware.cached else f"built in {middleware.build_seconds:.2f} s"
    print(f"middleware guest {state}: initrd {middleware.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
