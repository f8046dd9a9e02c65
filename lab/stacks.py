"""The three QEMU / libvirt / pcsc-lite stacks the tests run against (docs/lab.md#V20).

* ``HOST``: this machine, Debian 12 (QEMU 7.2, libvirt 9.0, pcsc-lite 1.9);
* ``TRIXIE``: Debian 13 (QEMU 10.0, libvirt 11.3, pcsc-lite 2.3);
* ``SID``: Debian unstable (QEMU 11.1, libvirt 12.8, pcsc-lite 2.5).

The two newer ones are Debian roots built with ``debootstrap`` from Debian's
archive into ``<repo>/.cache/roots/NAME`` by ``python -m lab.stacks`` (``make
setup``, *before* the network-less namespace), rebuilt when missing or when
:data:`ROOT_PACKAGES` (or this builder's version) changes, one build at a time
(a lock file).  The machine's own packages are never touched.

Their programs run chrooted *inside* ``.ci/isolated``'s private mount
namespace (:meth:`Stack.enter`): the namespace's /proc, /dev, /sys and /tmp and
the repository are bound into the root (libvirtd's QEMU dies at start without
/sys), /run gets a fresh tmpfs, and
/var/lib/libvirt a private one, so sockets under /tmp are shared between the
host's bridge and the root's QEMU while nothing the root's daemons write
outlives the namespace.  A process started through :meth:`Stack.command`
keeps its PID across ``chroot`` (it execs), so it is stopped by PID like the
host's.

A root that is missing or failed to build makes :meth:`Stack.problem` return
one line naming the stack and the reason, which the test fixtures turn into a
failure (never a skip).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import ROOT

#: Bump when the build steps change in a way ROOT_PACKAGES does not show.
BUILD_VERSION = 1
ROOTS = ROOT / ".cache" / "roots"
MIRROR = "http://deb.debian.org/debian"
#: What a root needs: QEMU (+ the spice chardev module, docs/lab.md#V21), libvirt
#: with virt-xml-validate, the guest's pcscd + libccid, zstd for its kernel.
ROOT_PACKAGES = (
    "qemu-system-x86", "qemu-system-modules-spice", "libvirt-daemon",
    "libvirt-daemon-driver-qemu", "libvirt-clients", "libxml2-utils",
    "pcscd", "libccid", "libpcsclite1", "zstd",
)
#: Where a root keeps the kernel packages its guest is built from (lab/guest/stackguest.py).
KERNEL_DIR = "/var/cache/ccidbridge-kernel"
STAMP = ".ccidbridge-root"


@dataclass(frozen=True)
class Stack:
    """One row of docs/lab.md#V20: a name, its Debian suite and the versions it ships."""

    name: str
    title: str
    #: Debian suite to debootstrap, or None for this machine itself.
    suite: str | None
    qemu: str
    libvirt: str
    pcsclite: str

    def __str__(self) -> str:
        return self.name

    @property
    def is_host(self) -> bool:
        return self.suite is None

    @property
    def root(self) -> Path:
        """The stack's ``/`` on this machine."""
        return Path("/") if self.suite is None else ROOTS / self.name

    def path(self, inside: str | os.PathLike[str]) -> Path:
        """The host path of ``inside`` (an absolute path as the stack's programs see it)."""
        inside = str(inside)
        if self.is_host:
            return Path(inside)
        return self.root / inside.lstrip("/")

    def inside(self, host_path: str | os.PathLike[str]) -> str:
        """The path the stack's programs see for a host path (bound or under the root)."""
        text = str(host_path)
        if self.is_host:
            return text
        root = str(self.root)
        if text == root or text.startswith(root + "/"):
            return text[len(root):] or "/"
        return text  # /tmp, /dev, /proc and the repository are bound at the same paths

    def executable(self, name: str) -> str:
        """A path to exec for the stack's program ``name``.

        For a root this is a two-line wrapper (``exec chroot ROOT name "$@"``),
        so APIs that take a binary (lab.guest's ``qemu=``) work unchanged and
        the PID they get is the program's.
        """
        if self.is_host:
            return shutil.which(name) or name
        wrapper = ROOTS / f"bin-{self.name}" / name
        text = f'#!/bin/sh\nexec chroot {self.root} {name} "$@"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.parent.mkdir(parents=True, exist_ok=True)
            tmp = wrapper.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.rename(wrapper)
        return str(wrapper)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run by the stack (chrooted for a root)."""
        if self.is_host:
            return list(argv)
        return ["chroot", str(self.root), *argv]

    def problem(self) -> str | None:
        """One line saying why this stack cannot be used here, or None."""
        if self.is_host:
            return None
        failed = ROOTS / f"{self.name}.failed"
        if failed.exists():
            return f"stack {self.name} ({self.title}): root build failed: " + \
                failed.read_text(errors="replace").strip().splitlines()[0]
        if not self.path("/" + STAMP).exists():
            return (f"stack {self.name} ({self.title}): no root at {self.root}: run `make setup` "
                    "outside .ci/isolated (debootstrap needs Debian's archive)")
        if read_stamp(self) != stamp_text(self):
            return (f"stack {self.name} ({self.title}): root at {self.root} is stale (its "
                    "package list changed): run `make setup`")
        return None

    def enter(self) -> None:
        """Bind the namespace's /proc, /dev, /sys, /tmp and the repository into the root; give
        it a fresh /run and /var/lib/libvirt.  Idempotent; only inside ``.ci/isolated``.
        """
        if self.is_host or self.name in _ENTERED:
            return
        if os.environ.get("CCIDBRIDGE_ISOLATED") != "1" or os.geteuid() != 0:
            raise StackError(f"stack {self.name}: chrooted programs only run as root inside "
                             ".ci/isolated (a private mount namespace)")
        problem = self.problem()
        if problem:
            raise StackError(problem)
        # The repository first and not recursively: it holds the root itself.
        for flag, source in (("--bind", str(ROOT)), ("--rbind", "/proc"), ("--rbind", "/dev"),
                             ("--rbind", "/sys"), ("--rbind", "/tmp")):
            target = self.path(source)
            target.mkdir(parents=True, exist_ok=True)
            _mount(flag, source, str(target))
        for target in ("/run", "/var/lib/libvirt"):
            self.path(target).mkdir(parents=True, exist_ok=True)
            _mount("-t", "tmpfs", "-o", "mode=0755", "ccidbridge-stack", str(self.path(target)))
        _ENTERED.add(self.name)

    def version_output(self) -> str:
        """``qemu-system-x86_64 --version``'s first line, as the stack runs it."""
        self.enter()
        out = subprocess.run(self.command(["qemu-system-x86_64", "--version"]),
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()


class StackError(RuntimeError):
    """A stack's root is missing, stale, failed to build, or cannot be entered here."""


_ENTERED: set[str] = set()

HOST = Stack("bookworm", "Debian 12", None, qemu="7.2", libvirt="9.0", pcsclite="1.9")
TRIXIE = Stack("trixie", "Debian 13", "trixie", qemu="10.0", libvirt="11.3", pcsclite="2.3")
SID = Stack("sid", "Debian sid", "sid", qemu="11.1", libvirt="12.8", pcsclite="2.5")
STACKS = (HOST, TRIXIE, SID)
ROOTED = (TRIXIE, SID)


def by_name(name: str) -> Stack:
    for stack in STACKS:
        if stack.name == name:
            return stack
    raise KeyError(f"unknown stack {name!r} (known: {', '.join(s.name for s in STACKS)})")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"mount {' '.join(args)}: {done.stderr.strip()}")


# --------------------------------------------------------------------------- building


def stamp_text(stack: Stack) -> str:
    """What a finished root's stamp holds: the inputs it was built from."""
    digest = hashlib.sha256(
        f"{BUILD_VERSION}\n{stack.suite}\n{MIRROR}\n{' '.join(ROOT_PACKAGES)}\n".encode()
    ).hexdigest()[:16]
    return f"{stack.suite} {digest}\n"


def read_stamp(stack: Stack) -> str | None:
    try:
        return stack.path("/" + STAMP).read_text()
    except OSError:
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mounted_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as f:
        points = [line.split()[1] for line in f]
    return sorted((p for p in points if p.startswith(prefix) or p == str(path)), reverse=True)


def _remove(path: Path) -> None:
    """Delete a root, unmounting whatever a failed debootstrap left mounted in it first."""
    for point in _mounted_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _reason(log: str) -> str:
    """The line of a build log that says why it failed."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pattern in (r"^E: ", r"^W: Failure", r"Temporary failure resolving", r"^E:|error",):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][:300]
    return (lines[-1] if lines else "no output")[:300]


def _run_logged(argv: list[str], log: Path, timeout: float) -> int:
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        try:
            return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout,
                                  env=dict(os.environ, DEBIAN_FRONTEND="noninteractive",
                                           LC_ALL="C")).returncode
        except subprocess.TimeoutExpired:
            out.write(f"E: timed out after {timeout:.0f} s\n")
            return 124


def build(stack: Stack, log: Path | None = None) -> float:
    """Build ``stack``'s root when it is missing or stale; return the seconds it took
    (0.0 when the root was current).  Raises StackError with one line on failure
    (also left in ``.cache/roots/NAME.failed`` for the tests to report)."""
    if stack.is_host:
        return 0.0
    if os.environ.get("CCIDBRIDGE_ISOLATED") == "1":
        raise StackError(f"stack {stack.name}: build the root outside .ci/isolated "
                         "(`make setup`): the namespace has no network")
    failed = ROOTS / f"{stack.name}.failed"
    with _locked(ROOTS / f".{stack.name}.lock"):
        if read_stamp(stack) == stamp_text(stack):
            failed.unlink(missing_ok=True)
            return 0.0
        started = time.monotonic()
        log = log or ROOTS / f"{stack.name}.log"
        log.write_text("")
        try:
            _build(stack, log)
        except StackError as exc:
            failed.write_text(f"{exc}\n")
            raise StackError(f"stack {stack.name} ({stack.title}): root build failed: "
                             f"{exc} (log: {log})") from None
        failed.unlink(missing_ok=True)
        return time.monotonic() - started


def _build(stack: Stack, log: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise StackError("debootstrap is not installed (see .ci/debian-packages)")
    tmp = ROOTS / f"{stack.name}.tmp"
    _remove(tmp)
    packages = " ".join(ROOT_PACKAGES)
    # minbase stops at systemd's pre-dependency; the chrooted apt finishes the job
    # (docs/lab.md#V20).  Its exit status is therefore not the verdict: the final
    # apt-get install is.
    _run_logged(["debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
                 str(stack.suite), str(tmp), MIRROR], log, 1200)
    if not (tmp / "usr/bin/apt-get").exists():
        raise StackError(f"debootstrap {stack.suite} produced no root: "
                         f"{_reason(log.read_text(errors='replace'))}")
    script = (
        "set -e; dpkg --configure -a || true; apt-get -f install -y -q || true; "
        # Debian's archive as mirrored here may serve a sid Release file past its
        # Valid-Until date (docs/lab.md#V20): the signature still counts.
        "apt-get update -q -o Acquire::Check-Valid-Until=false; "
        f"apt-get install -y -q --no-install-recommends {packages}; "
        f"mkdir -p {KERNEL_DIR}; cd {KERNEL_DIR}; "
        "pkg=$(apt-cache depends linux-image-amd64 "
        "| sed -n 's/.*Depends: \\(linux-image-[0-9].*\\)/\\1/p' | head -1); "
        "test -n \"$pkg\"; "
        # sid splits the kernel: the image package depends on linux-binary-VER and
        # linux-modules-VER (docs/lab.md#V22); download whichever exist.
        "deps=$(apt-cache depends \"$pkg\" "
        "| sed -n 's/.*Depends: \\(linux-\\(binary\\|modules\\)-[0-9][^ ]*\\)/\\1/p'); "
        "apt-get download -q -o APT::Sandbox::User=root \"$pkg\" $deps; "
        "apt-get clean"
    )
    rc = _run_logged(["chroot", str(tmp), "sh", "-c", script], log, 1800)
    for point in _mounted_under(tmp):
        subprocess.run(["umount", "-l", point], capture_output=True)
    if rc != 0:
        raise StackError(_reason(log.read_text(errors="replace")))
    missing = [p for p in ("usr/bin/qemu-system-x86_64", "usr/sbin/libvirtd", "usr/bin/virsh",
                           "usr/sbin/pcscd") if not (tmp / p).exists()]
    if missing:
        raise StackError(f"the root lacks {', '.join(missing)}")
    (tmp / STAMP).write_text(stamp_text(stack))
    _remove(stack.root)
    tmp.rename(stack.root)


def main(argv: list[str]) -> int:
    """``python -m lab.stacks [NAME...]``: build the missing or stale roots."""
    stacks = [by_name(n) for n in argv] if argv else list(ROOTED)
    status = 0
    for stack in stacks:
        try:
            took = build(stack)
        except StackError as exc:
            print(f"ccidbridge: {exc}", file=sys.stderr)
            status = 1
            continue
        state = f"built in {took:.0f} s" if took else "up to date"
        print(f"stack {stack.name} ({stack.title}): root {state}: {stack.root}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
