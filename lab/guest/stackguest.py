"""The test guest built from a newer stack's root: Debian 13 (kernel 6.12, pcscd 2.3,
libccid 1.6) or sid (kernel 7.2, pcscd 2.5, libccid 1.8) (docs/lab.md#V22).

Same shape as lab/guest/build.py's guest (same /init, client and cpio writer),
but everything in the image comes from the stack's root (lab.stacks) instead of
this machine:

* the kernel package(s) the root build downloaded into ``KERNEL_DIR``: trixie's
  ``linux-image-VER`` holds ``/boot/vmlinuz-VER``; sid splits it into
  ``linux-binary-VER`` (``/usr/lib/modules/VER/vmlinuz``) and
  ``linux-modules-VER``;
* the bzImage is **zstd**-compressed (not XZ): the ELF ``vmlinux`` is cut out
  of it with ``zstd -dc`` from the zstd magic; the modules are ``.ko.xz`` and
  are decompressed at build time (Python's lzma) so /init's ``insmod`` works;
* pcscd, libccid and every library ``ldd`` lists *inside the root*, plus
  ``libpcsclite_real.so.1`` (pcsc-lite 2.x's ``libpcsclite.so.1`` dlopen()s it:
  "no pcscd: Internal error" without it) and libgcc_s;
* /usr/sbin/pcscd is a two-line wrapper adding ``--disable-polkit`` (pcscd 2.x
  asks polkit, over D-Bus the initramfs does not have).

Cached in ``<guest cache>/stacks/<stack>/<key>/`` where ``key`` hashes the
root's stamp, the kernel packages and the guest's sources.  Built by ``python
-m lab.guest.stackguest`` (``make setup``), outside the namespace.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.guest import build
from lab.guest.build import GuestBuildError, GuestImage, default_cache_dir
from lab.guest.cpio import CpioWriter
from lab.stacks import KERNEL_DIR, ROOTED, Stack, by_name, read_stamp

BUILD_VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LIB_DIR = "/usr/lib/x86_64-linux-gnu"
PCSCD_WRAPPER = b'#!/bin/sh\nexec /usr/sbin/pcscd.real --disable-polkit "$@"\n'


def _debs(stack: Stack) -> list[Path]:
    debs = sorted(stack.path(KERNEL_DIR).glob("linux-*.deb"))
    if not debs:
        raise GuestBuildError(f"stack {stack.name}: no kernel packages in {KERNEL_DIR} "
                              "(rebuild the root: `make setup`)")
    return debs


def _key(stack: Stack) -> str:
    digest = hashlib.sha256(f"stackguest={BUILD_VERSION}\n{read_stamp(stack)}\n".encode())
    for deb in _debs(stack):
        digest.update(deb.name.encode() + b"\0")
    for name in ("client.c", "init.sh", "cpio.py"):
        digest.update(name.encode() + b"\0" + (build.HERE / name).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def build_stack_guest(stack: Stack, cache_dir: Path | None = None) -> GuestImage:
    """The guest of ``stack`` (a rooted one), built when missing."""
    if stack.is_host:
        return build.build_guest(cache_dir)
    problem = stack.problem()
    if problem:
        raise GuestBuildError(problem)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = cache_dir / "stacks" / stack.name
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with build._locked(base / ".lock"):
        key = _key(stack)
        out = base / key
        cached = (out / "initrd.gz").exists() and (out / "vmlinux").exists()
        if not cached:
            _build(stack, out)
            build._prune(base, keep=out, count=2)
    return GuestImage(
        vmlinux=out / "vmlinux",
        initrd=out / "initrd.gz",
        kernel_version=(out / "kver").read_text().strip(),
        key=key,
        build_seconds=0.0 if cached else time.monotonic() - started,
        cached=cached,
    )


def _build(stack: Stack, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="tmp-") as tmp:
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        for deb in _debs(stack):
            _extract(deb, staging)
        vmlinuz = sorted(staging.glob("boot/vmlinuz-*")) + sorted(
            staging.glob("usr/lib/modules/*/vmlinuz"))
        if not vmlinuz:
            raise GuestBuildError(f"stack {stack.name}: the kernel packages hold no vmlinuz")
        kver = (vmlinuz[0].name.removeprefix("vmlinuz-") if vmlinuz[0].name != "vmlinuz"
                else vmlinuz[0].parent.name)
        image = Path(tmp) / "image"
        image.mkdir()
        (image / "vmlinux").write_bytes(extract_vmlinux(vmlinuz[0].read_bytes()))
        modules = {}
        for rel in build.MODULES:
            src = staging / "usr/lib/modules" / kver / "kernel" / (rel + ".xz")
            if not src.exists():
                raise GuestBuildError(f"stack {stack.name}: kernel {kver} lacks {rel}.xz")
            modules[Path(rel).name] = lzma.decompress(src.read_bytes())
        client = Path(tmp) / "ccidt-client"
        build._compile_client(client)
        archive = _collect(stack, modules, client)
        with gzip.GzipFile(image / "initrd.gz", "wb", compresslevel=6, mtime=0) as gz:
            gz.write(archive.getvalue())
        (image / "kver").write_text(kver + "\n")
        shutil.rmtree(out, ignore_errors=True)
        image.rename(out)


def _extract(deb: Path, staging: Path) -> None:
    wanted = ["./boot/vmlinuz-*", "./usr/lib/modules/*/vmlinuz",
              *(f"./usr/lib/modules/*/kernel/{m}.xz" for m in build.MODULES)]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        # tar exits 2 when a package holds none of the patterns (sid's split packages)
        subprocess.run(["tar", "-x", "-C", str(staging), "--wildcards", *wanted],
                       stdin=tar.stdout, timeout=300, capture_output=True)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(timeout=60)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside a zstd-compressed bzImage (Debian 13 and sid)."""
    offset = bzimage.find(ZSTD_MAGIC)
    if offset < 0:
        raise GuestBuildError("vmlinuz holds no zstd stream")
    if shutil.which("zstd") is None:
        raise GuestBuildError("zstd is not installed (see .ci/debian-packages)")
    done = subprocess.run(["zstd", "-dc", "-q"], input=bzimage[offset:], capture_output=True,
                          timeout=120)
    # the stream is followed by the bzImage's trailer: zstd complains, the ELF is whole
    elf = done.stdout
    if not elf.startswith(b"\x7fELF"):
        raise GuestBuildError(f"the zstd stream in vmlinuz is no ELF: {done.stderr[-300:]!r}")
    return elf


def _in_root(stack: Stack, inside: str) -> Path:
    """``inside`` resolved within the root (absolute symlinks stay inside it)."""
    path = stack.path(inside)
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = stack.path(target) if target.startswith("/") else (path.parent / target)
        path = Path(os.path.normpath(path))
    raise GuestBuildError(f"symlink loop at {inside} in {stack.root}")


def _ldd(stack: Stack, inside: str) -> list[str]:
    done = subprocess.run(["chroot", str(stack.root), "ldd", inside], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        raise GuestBuildError(f"ldd {inside} in {stack.name}: {done.stderr.strip()}")
    return [m.group(1) for m in re.finditer(r"(/\S+)\s+\(0x", done.stdout)]


def _collect(stack: Stack, modules: dict[str, bytes], client: Path) -> CpioWriter:
    cpio = CpioWriter()
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "root", "usr/bin", "usr/sbin", "sbin"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", (build.HERE / "init.sh").read_bytes(), 0o755)
    cpio.file("bin/busybox", build._static_busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name, data in modules.items():
        cpio.file(f"lib/modules/{name}", data)
    bundle = str(build.CCID_BUNDLE)
    libccid = f"{bundle}/Contents/Linux/libccid.so"
    plist = f"{bundle}/Contents/Info.plist"
    for inside in ("/usr/sbin/pcscd", libccid, plist, f"{LIB_DIR}/libpcsclite_real.so.1"):
        if not _in_root(stack, inside).exists():
            raise GuestBuildError(f"stack {stack.name}: {inside} is missing from the root")
    cpio.file("usr/sbin/pcscd.real", _in_root(stack, "/usr/sbin/pcscd").read_bytes(), 0o755)
    cpio.file("usr/sbin/pcscd", PCSCD_WRAPPER, 0o755)
    cpio.file(libccid.lstrip("/"), _in_root(stack, libccid).read_bytes(), 0o755)
    cpio.file(plist.lstrip("/"), _in_root(stack, plist).read_bytes())
    cpio.file("usr/bin/ccidt-client", client.read_bytes(), 0o755)
    # ldd the host-built client against the root's libraries, from inside the root
    probe = stack.path(f"/tmp/ccidt-client-{os.getpid()}")
    shutil.copyfile(client, probe)
    probe.chmod(0o755)
    try:
        libs = set(_ldd(stack, stack.inside(probe)))
    finally:
        probe.unlink(missing_ok=True)
    for inside in ("/usr/sbin/pcscd", libccid, f"{LIB_DIR}/libpcsclite_real.so.1"):
        libs.update(_ldd(stack, inside))
    libs.update({f"{LIB_DIR}/libpcsclite_real.so.1", f"{LIB_DIR}/libgcc_s.so.1"})
    for lib in sorted(libs):
        data = _in_root(stack, lib).read_bytes()
        cpio.file(lib.lstrip("/"), data, 0o755)
        if lib.startswith("/usr/lib/"):  # merged /usr: also reachable as /lib/...
            cpio.file(lib.removeprefix("/usr").lstrip("/"), data, 0o755)
    return cpio


def main(argv: list[str]) -> int:
    """``python -m lab.guest.stackguest [STACK...]``: build the newer stacks' guests."""
    status = 0
    for stack in [by_name(n) for n in argv] if argv else list(ROOTED):
        started = time.monotonic()
        try:
            image = build_stack_guest(stack)
        except GuestBuildError as exc:
            print(f"ccidbridge: {stack.name} guest build failed: {exc}", file=sys.stderr)
            status = 1
            continue
        state = "cached" if image.cached else "built"
        print(f"guest of {stack.name} {state} in {time.monotonic() - started:.2f} s: "
              f"kernel {image.kernel_version}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
