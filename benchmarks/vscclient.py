"""``python -m benchmarks.vscclient``: build libcacard's vscclient for the apdu item.

libcacard's ``vscclient -e passthru`` is the C program ccidbridge replaces
(it connects to QEMU's ``ccid-card-passthru`` over TCP and relays to a PC/SC
card), so it is the yardstick of the ``apdu`` item.  Debian 12 does not ship
it; this builds it from Debian 12's own libcacard 2.8.0 source package with
PC/SC enabled, in the project's ignored cache (``.cache/vscclient``):

1. a private apt source list (a ``deb-src`` line for bookworm, its own
   lists and cache directories: the machine's apt configuration is not
   touched);
2. ``apt-get source --download-only libcacard``, unpacked with ``dpkg-source``;
3. ``meson setup -Dpcsc=enabled -Ddisable_tests=true`` and ``ninja``.

Nothing of libcacard enters the repository: the source and the binary stay
in the cache.  ``make bench-deps`` runs this before ``make bench`` enters the
network-less namespace (the download needs Debian's archive); it is cached,
so later runs cost nothing.  The build dependencies are in
``.ci/bench-packages``.  The time the build took goes to
``.cache/vscclient/build.json`` and from there into the run's JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "vscclient"
BINARY = CACHE / "build" / "vscclient"
INFO = CACHE / "build.json"
#: The upstream version the apdu item compares with (docs/benchmarks.md#B1).
UPSTREAM = "2.8.0"

SOURCES = """\
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def _apt_options() -> list[str]:
    apt = CACHE / "apt"
    return [
        "-o", "Dir::Etc::SourceList=/dev/null",
        "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Sandbox::User=root",
        "-q",
    ]  # fmt: skip


def _run(args: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run(args, cwd=cwd, check=True)


def info() -> dict[str, object]:
    """What :func:`build` recorded (version, seconds), or {} if not built."""
    try:
        return json.loads(INFO.read_text())
    except (OSError, ValueError):
        return {}


def build(force: bool = False) -> Path:
    """Build (if not cached) and return the path of ``vscclient``."""
    if BINARY.exists() and not force:
        return BINARY
    t0 = time.monotonic()
    apt = CACHE / "apt"
    for d in (apt / "sources.list.d", apt / "lists" / "partial", apt / "cache" / "archives"):
        d.mkdir(parents=True, exist_ok=True)
    (apt / "sources.list.d" / "bookworm-src.sources").write_text(SOURCES)
    _run(["apt-get", *_apt_options(), "update"])
    dl = CACHE / "download"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir()
    _run(["apt-get", *_apt_options(), "source", "--download-only", "libcacard"], cwd=dl)
    dsc = sorted(dl.glob("libcacard_*.dsc"))
    if len(dsc) != 1:
        raise SystemExit(f"vscclient: expected one libcacard .dsc in {dl}, found {dsc}")
    debian_version = dsc[0].stem.removeprefix("libcacard_")
    if not debian_version.startswith(UPSTREAM) and f":{UPSTREAM}" not in debian_version:
        raise SystemExit(f"vscclient: Debian's libcacard is {debian_version}, not {UPSTREAM}")
    src = CACHE / "src"
    shutil.rmtree(src, ignore_errors=True)
    _run(["dpkg-source", "--no-check", "-x", str(dsc[0]), str(src)])
    out = CACHE / "build"
    shutil.rmtree(out, ignore_errors=True)
    _run(["meson", "setup", str(out), str(src), "-Dpcsc=enabled", "-Ddisable_tests=true"])
    _run(["ninja", "-C", str(out), "vscclient"])
    if not BINARY.exists():
        raise SystemExit(f"vscclient: the build did not produce {BINARY}")
    seconds = round(time.monotonic() - t0, 1)
    INFO.write_text(
        json.dumps({"libcacard": debian_version, "seconds": seconds, "pcsc": "enabled"}) + "\n"
    )
    print(f"vscclient: libcacard {debian_version} built in {seconds} s: {BINARY}", flush=True)
    return BINARY


if __name__ == "__main__":
    build(force="--force" in sys.argv[1:])
