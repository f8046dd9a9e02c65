"""The middleware guest: the minimal guest plus OpenSC and GnuPG, and a way to
run a list of shell commands in it and collect each one's output and status.

The image is the minimal guest's initrd (build.py) with a second cpio
archive appended (the kernel unpacks concatenated archives; a later entry
replaces an earlier one).  The addition holds OpenSC's tools, its PKCS#11
module and /etc/opensc, GnuPG's gpg, gpg-agent, gpgconf, gpg-connect-agent
and scdaemon, every library ``ldd`` lists for them, libpcsclite.so.1 (OpenSC
and scdaemon dlopen() it, so ldd does not show it), the test pinentry of
lab/cards/gnupg.py and ``/ccidt/main`` (run_commands.sh), which /init runs
instead of the PC/SC client.  Cached next to the minimal image:
``<cache>/middleware/<key>/initrd.gz``, ``key`` hashing the minimal image's key,
these files and the versions of the Debian packages copied.

GnuPG runs in the guest as lab/cards/gnupg.py runs it on the host: a private
GNUPGHOME whose scdaemon goes over pcscd (``disable-ccid``, libpcsclite), and
the PIN (the test cards' PW1) from the test pinentry.  Commands run with ``sh``; in the guest each
one is bounded by ``cmd_timeout`` and its stdout and stderr are printed
between markers on the serial console (run_commands.sh), parsed here into
:class:`CommandResult`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.cards.gnupg import PCSC_LIB
from lab.cards.gnupg import PINENTRY as PINENTRY_SCRIPT
from lab.cards.openpgp import PW1
from lab.guest import boot
from lab.guest.build import (
    HERE,
    GuestBuildError,
    GuestImage,
    _locked,
    _shared_libraries,
    build_guest,
    default_cache_dir,
)
from lab.guest.cpio import CpioWriter

#: Bump when the layout changes in a way the hashed files do not show.
MIDDLEWARE_VERSION = 1
LIB = Path("/usr/lib/x86_64-linux-gnu")
PACKAGES = ("opensc", "opensc-pkcs11", "gpg", "gpg-agent", "gpgconf", "scdaemon", "libpcsclite1")
PROGRAMS = (
    Path("/usr/bin/opensc-tool"),
    Path("/usr/bin/pkcs15-tool"),
    Path("/usr/bin/pkcs11-tool"),
    Path("/usr/bin/openpgp-tool"),
    Path("/usr/bin/opensc-explorer"),
    Path("/usr/bin/piv-tool"),
    Path("/usr/bin/gpg"),
    Path("/usr/bin/gpg-agent"),
    Path("/usr/bin/gpgconf"),
    Path("/usr/bin/gpg-connect-agent"),
    Path("/usr/lib/gnupg/scdaemon"),
)
#: dlopen()ed, so ldd does not list them (the PKCS#11 module's own libraries are).
MODULES = (LIB / "opensc-pkcs11.so", LIB / "libpcsclite.so.1")
OPENSC_CONF = Path("/etc/opensc/opensc.conf")
PINENTRY = "/ccidt/pinentry/pinentry.sh"  # reads the PIN from "pin" beside it


def gnupg_conf() -> dict[str, str]:
    """The guest's GNUPGHOME config: lab/cards/gnupg.py's, with guest paths."""
    return {
        "scdaemon.conf": f"disable-ccid\npcsc-driver {PCSC_LIB}\n",
        "gpg-agent.conf": f"pinentry-program {PINENTRY}\nallow-loopback-pinentry\n",
    }


# --------------------------------------------------------------------------- build


def _versions() -> dict[str, str]:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}=${Version} ${db:Status-Status}\n", *PACKAGES],
        capture_output=True, text=True, timeout=60,
    )
    found = {}
    for line in done.stdout.splitlines():
        pkg_ver, _, status = line.partition(" ")
        pkg, _, ver = pkg_ver.partition("=")
        if status == "installed":
            found[pkg.split(":")[0]] = ver
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise GuestBuildError(
            f"host packages missing for the middleware guest: {' '.join(missing)} "
            "(see .ci/debian-packages)"
        )
    return found


def _key(base: GuestImage) -> str:
    digest = hashlib.sha256(f"middleware={MIDDLEWARE_VERSION}\nbase={base.key}\n".encode())
    for name in ("middleware.py", "run_commands.sh"):
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    digest.update(PINENTRY_SCRIPT.encode() + PW1)
    digest.update(json.dumps(_versions(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build_middleware_guest(cache_dir: Path | None = None) -> GuestImage:
    """The middleware guest for the current inputs, building what is missing."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = build_guest(cache_dir)
    started = time.monotonic()
    with _locked(cache_dir / ".lock"):
        key = _key(base)
        image_dir = cache_dir / "middleware" / key
        cached = (image_dir / "initrd.gz").exists()
        if not cached:
            _build(base, image_dir)
            for old in image_dir.parent.iterdir():
                if old != image_dir and not old.name.startswith("tmp-"):
                    shutil.rmtree(old, ignore_errors=True)
    return GuestImage(
        vmlinux=base.vmlinux,
        initrd=image_dir / "initrd.gz",
        kernel_version=base.kernel_version,
        key=key,
        build_seconds=0.0 if cached else time.monotonic() - started,
        cached=cached,
    )


def _build(base: GuestImage, image_dir: Path) -> None:
    for path in (*PROGRAMS, *MODULES, OPENSC_CONF):
        if not path.exists():
            raise GuestBuildError(f"{path} is missing (see .ci/debian-packages)")
    cpio = CpioWriter()
    for path in PROGRAMS:
        cpio.file(str(path), path.read_bytes(), 0o755)
    for path in MODULES:
        cpio.file(str(path), path.resolve().read_bytes(), 0o755)
    cpio.symlink(str(LIB / "pkcs11" / "opensc-pkcs11.so"), "../opensc-pkcs11.so")
    cpio.file(str(OPENSC_CONF), OPENSC_CONF.read_bytes())
    for dest, src in _shared_libraries([*PROGRAMS, *MODULES]).items():
        cpio.file(dest, src.resolve().read_bytes(), 0o755)
    cpio.file("ccidt/main", (HERE / "run_commands.sh").read_bytes(), 0o755)
    cpio.file(PINENTRY, PINENTRY_SCRIPT.encode(), 0o755)
    cpio.file(str(Path(PINENTRY).parent / "pin"), PW1)
    for name, text in gnupg_conf().items():
        cpio.file(f"ccidt/gnupg/{name}", text.encode())
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=image_dir.parent, prefix="tmp-") as tmp:
        out = Path(tmp) / "image"
        out.mkdir()
        base_bytes = base.initrd.read_bytes()
        extra = gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0)
        (out / "initrd.gz").write_bytes(base_bytes + extra)
        manifest = {"base": base.key, "packages": _versions(), "version": MIDDLEWARE_VERSION}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(image_dir, ignore_errors=True)
        out.rename(image_dir)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class CommandResult:
    """One command's combined stdout+stderr and exit status."""

    command: str
    output: str
    rc: int | None  # None: the command never finished (guest run cut short)

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


@dataclass
class MiddlewareRun:
    """A middleware guest run: the results in command order, and the raw run."""

    results: list[CommandResult]
    run: boot.GuestRun

    def check(self) -> MiddlewareRun:
        """Raise unless every command finished (its rc is another matter)."""
        if any(r.rc is None for r in self.results) or not self.run.ok:
            raise boot.GuestError(
                f"middleware guest run incomplete: {[r.rc for r in self.results]}\n"
                f"{self.run.console_tail(80)}"
            )
        return self


def _overlay(image: GuestImage, commands: Sequence[str], directory: Path) -> Path:
    cpio = CpioWriter()
    for i, command in enumerate(commands):
        cpio.file(f"ccidt/cmd/{i:03d}", command.encode() + b"\n")
    base = image.initrd.read_bytes()
    path = directory / "initrd-commands.gz"
    path.write_bytes(base + b"\0" * (-len(base) % 4) + cpio.getvalue())
    return path


def start_commands(
    image: GuestImage,
    device_args: Sequence[str],
    commands: Sequence[str],
    timeout: float = 120.0,
    *,
    cmd_timeout: float = 60.0,
    params: Mapping[str, str | int] | None = None,
    qemu: str = boot.QEMU,
) -> boot.GuestHandle:
    """Start the middleware guest running ``commands``; returns at once."""
    scratch = tempfile.TemporaryDirectory(prefix="ccidt-mw-")
    try:
        initrd = _overlay(image, commands, Path(scratch.name))
        append = boot.kernel_append(
            guest_timeout=max(1.0, timeout - 2.0),
            params={"cmd_timeout": int(cmd_timeout), **(params or {})},
        )
        argv = boot.qemu_argv(image, device_args, append, qemu, initrd)
        return boot.GuestHandle(argv, timeout, None, scratch)
    except BaseException:
        scratch.cleanup()
        raise


def collect(commands: Sequence[str], run: boot.GuestRun) -> MiddlewareRun:
    """Parse the ``cmd``/``out`` records of a finished run."""
    output: dict[int, list[str]] = {i: [] for i in range(len(commands))}
    rcs: dict[int, int] = {}
    for record in run.records:
        head, _, rest = record.text.partition(" ")
        if not head.startswith("n="):
            continue
        n = int(head[2:])
        if record.kind == "out" and n in output:
            output[n].append(rest[1:] if rest.startswith("|") else rest)
        elif record.kind == "cmd" and rest.startswith("end"):
            rcs[n] = int(record.fields.get("rc", "-1"))
    results = [
        CommandResult(c, "".join(line + "\n" for line in output[i]), rcs.get(i))
        for i, c in enumerate(commands)
    ]
    return MiddlewareRun(results, run)


def run_commands(
    image: GuestImage, device_args: Sequence[str], commands: Sequence[str],
    timeout: float = 120.0, **kwargs: object,
) -> MiddlewareRun:
    """Boot the middleware guest, run ``commands`` in order, return their results."""
    with start_commands(image, device_args, commands, timeout, **kwargs) as handle:  # type: ignore[arg-type]
        return collect(commands, handle.result())


def run_on_host(
    commands: Sequence[str], env: Mapping[str, str], timeout: float = 60.0,
) -> list[CommandResult]:
    """The same commands on the host (``sh -c``, stdout+stderr combined)."""
    results = []
    full_env = {**os.environ, **env}
    for command in commands:
        try:
            done = subprocess.run(
                ["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=full_env, timeout=timeout,
            )
            results.append(CommandResult(command, done.stdout.decode("utf-8", "replace"),
                                         done.returncode))
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode("utf-8", "replace")
            results.append(CommandResult(command, out, None))
    return results
