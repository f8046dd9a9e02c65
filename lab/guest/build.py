"""Build the tiny test guest: Debian's kernel plus a ~4 MB initramfs.

The guest is Debian 12's own ``linux-image-*-amd64`` (downloaded with
``apt-get download`` and unpacked in the cache, never installed on the host),
busybox-static, the host's pcscd + libccid and a small PC/SC client
(``client.c``).  ``init.sh`` becomes /init.  Results are cached:

``<cache>/kernel/<package>_<version>/``  vmlinux, the four USB modules, ``kver``
``<cache>/images/<key>/``  initrd.gz and manifest.json, where ``key`` hashes
every input (client.c, init.sh, this builder's version, the kernel and the
versions of the host packages copied into the initramfs).

A second call with the same inputs only hashes them (a few ms).  Measured
here: cold build 3.8 s including the 70 MB download (a fast mirror), 0.5 s
for a new initramfs when the kernel is already unpacked.  Needs no root and no
cpio/xz binaries (Python writes the cpio and decodes the XZ stream).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab import ROOT
from lab.guest.cpio import CpioWriter

#: Bump when the image layout changes in a way the hashed files do not show.
BUILD_VERSION = 1
HERE = Path(__file__).resolve().parent
KERNEL_META_PACKAGE = "linux-image-amd64"
#: Loaded by /init in this order; everything else the guest needs is built in.
MODULES = (
    "drivers/usb/common/usb-common.ko",
    "drivers/usb/core/usbcore.ko",
    "drivers/usb/host/xhci-hcd.ko",
    "drivers/usb/host/xhci-pci.ko",
)
HOST_PACKAGES = ("pcscd", "libccid", "libpcsclite1", "busybox-static", "libc6", "libusb-1.0-0")
CCID_BUNDLE = Path("/usr/lib/pcsc/drivers/ifd-ccid.bundle")
XZ_MAGIC = b"\xfd7zXZ\x00"


class GuestBuildError(RuntimeError):
    """The guest could not be built; the message says which package or tool is missing."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: ``qemu -kernel vmlinux -initrd initrd``."""

    vmlinux: Path
    initrd: Path
    kernel_version: str
    key: str
    #: Seconds the build took in this process (0.0 when it came from the cache).
    build_seconds: float = 0.0
    #: True when this call reused a finished image.
    cached: bool = True


def default_cache_dir() -> Path:
    """``$CCIDBRIDGE_GUEST_CACHE``, else ``<repo>/.cache/guest`` (gitignored)."""
    env = os.environ.get("CCIDBRIDGE_GUEST_CACHE")
    if env:
        return Path(env)
    return ROOT / ".cache" / "guest"


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the guest image for the current inputs, building what is missing.

    Safe to call from several processes at once (a lock file serialises them).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked(cache_dir / ".lock"):
        kernel_dir = _kernel(cache_dir)
        key = _image_key(kernel_dir)
        image_dir = cache_dir / "images" / key
        cached = (image_dir / "initrd.gz").exists()
        if not cached:
            _build_image(kernel_dir, image_dir)
            _prune(image_dir.parent, keep=image_dir)
    return GuestImage(
        vmlinux=kernel_dir / "vmlinux",
        initrd=image_dir / "initrd.gz",
        kernel_version=(kernel_dir / "kver").read_text().strip(),
        key=key,
        build_seconds=0.0 if cached else time.monotonic() - started,
        cached=cached,
    )


def _prune(images: Path, keep: Path, count: int = 4) -> None:
    """Delete all but the ``count`` newest images (each is about 4 MB)."""
    others = sorted((p for p in images.iterdir() if p.is_dir() and p != keep
                     and not p.name.startswith("tmp-")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[count - 1:]:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- kernel


def _kernel(cache_dir: Path) -> Path:
    """The unpacked kernel directory, downloading it on first use.

    An already unpacked kernel is reused without asking apt, so the harness
    works offline and does not change kernels under a test run when Debian
    publishes a new one.  Delete ``<cache>/kernel`` to pick up a new kernel;
    set ``CCIDBRIDGE_GUEST_KERNEL_DEB`` to use a given .deb file instead.
    """
    deb_env = os.environ.get("CCIDBRIDGE_GUEST_KERNEL_DEB")
    root = cache_dir / "kernel"
    if not deb_env:
        existing = sorted(p for p in root.glob("*/kver") if (p.parent / "vmlinux").exists())
        if existing:
            return existing[-1].parent
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="tmp-kernel-") as tmp:
        deb = Path(deb_env) if deb_env else _download_kernel(Path(tmp))
        name = deb.name.removesuffix(".deb")
        target = root / name
        if (target / "kver").exists() and (target / "vmlinux").exists():
            return target
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        _unpack_kernel(deb, staging, Path(tmp) / "out")
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        (Path(tmp) / "out").rename(target)
    return target


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{cmd[0]} is missing (see .ci/debian-packages)") from exc
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _kernel_package() -> str:
    """The versioned image package ``linux-image-amd64`` points at."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    match = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
    if not match:
        raise GuestBuildError(f"cannot find the kernel package in: {out!r}")
    return match.group(1)


def _download_kernel(tmp: Path) -> Path:
    """``apt-get download`` the kernel .deb (about 70 MB) into ``tmp``.

    A fresh container has no package lists, so on failure run ``apt-get
    update`` once and retry.  ``APT::Sandbox::User=root`` silences apt's
    "_apt cannot access the directory" warning for private temp dirs.
    """
    sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    download = ["apt-get", "-q", *sandbox, "download"]
    try:
        _run(download + [_kernel_package()], cwd=tmp)
    except GuestBuildError as exc:
        if os.environ.get("CCIDBRIDGE_ISOLATED") == "1":
            raise GuestBuildError(
                f"{exc}\nThe test namespace (.ci/isolated) has no network: build the guest "
                "first with `.venv/bin/python -m lab.guest` outside it."
            ) from exc
        _run(["apt-get", "-q", "update"])
        _run(download + [_kernel_package()], cwd=tmp)
    debs = sorted(tmp.glob("linux-image-*.deb"))
    if not debs:
        raise GuestBuildError("apt-get download produced no linux-image .deb")
    return debs[0]


def _unpack_kernel(deb: Path, staging: Path, out: Path) -> None:
    """Extract only vmlinuz and the USB modules, then decompress vmlinuz.

    Pitfall: under TCG the bzImage spends about 4 s decompressing itself.  The
    XZ stream inside it holds an ELF ``vmlinux`` with a PVH note
    (CONFIG_PVH=y) that ``qemu -kernel`` boots directly, so we extract it.
    Python's lzma decodes the kernel's x86 BCJ filter, so no xz binary is
    needed; the stream is followed by padding, hence one-stream decoding.
    """
    wanted = ["./boot/vmlinuz-*"] + [f"./lib/modules/*/kernel/{m}" for m in MODULES]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(staging), "--wildcards", *wanted],
                       stdin=tar.stdout, check=True, timeout=300, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise GuestBuildError(f"unpacking {deb.name} failed: {exc.stderr.decode()[-500:]}") from exc
    finally:
        tar.stdout.close()
        tar.wait(timeout=60)
    vmlinuz = sorted((staging / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise GuestBuildError(f"{deb.name} holds no /boot/vmlinuz-*")
    kver = vmlinuz[0].name.removeprefix("vmlinuz-")
    out.mkdir()
    (out / "vmlinux").write_bytes(_extract_vmlinux(vmlinuz[0].read_bytes()))
    modules = out / "modules"
    modules.mkdir()
    for rel in MODULES:
        src = staging / "lib" / "modules" / kver / "kernel" / rel
        if not src.exists():
            raise GuestBuildError(f"{deb.name} lacks {rel} (compressed modules are not handled)")
        shutil.copyfile(src, modules / Path(rel).name)
    (out / "kver").write_text(kver + "\n")
    (out / "package").write_text(deb.name + "\n")


def _extract_vmlinux(bzimage: bytes) -> bytes:
    offset = bzimage.find(XZ_MAGIC)
    if offset < 0:
        raise GuestBuildError("vmlinuz holds no XZ stream (kernel not XZ-compressed?)")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = decoder.decompress(bzimage[offset:])
    if not decoder.eof or not elf.startswith(b"\x7fELF"):
        raise GuestBuildError("the XZ stream in vmlinuz is not a complete ELF vmlinux")
    return elf


# --------------------------------------------------------------------------- initramfs


def _package_versions() -> dict[str, str]:
    fmt = "${Package}=${Version} ${db:Status-Status}\n"
    done = subprocess.run(["dpkg-query", "-W", "-f", fmt, *HOST_PACKAGES],
                          capture_output=True, text=True, timeout=60)
    versions = {}
    for line in done.stdout.splitlines():
        pkg_ver, _, status = line.partition(" ")
        pkg, _, ver = pkg_ver.partition("=")
        if status == "installed":
            versions[pkg] = ver
    missing = [p for p in HOST_PACKAGES if p not in versions and p != "libusb-1.0-0"]
    if missing:
        raise GuestBuildError(f"host packages missing: {' '.join(missing)} (apt-get install them)")
    return versions


def _image_key(kernel_dir: Path) -> str:
    digest = hashlib.sha256()
    digest.update(f"build={BUILD_VERSION}\n".encode())
    for name in ("client.c", "init.sh", "build.py", "cpio.py"):
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    digest.update((kernel_dir / "package").read_bytes() if (kernel_dir / "package").exists()
                  else kernel_dir.name.encode())
    digest.update(json.dumps(_package_versions(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _build_image(kernel_dir: Path, image_dir: Path) -> None:
    """Compile the client, collect files and libraries, write initrd.gz."""
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=image_dir.parent, prefix="tmp-") as tmp:
        client = Path(tmp) / "ccidt-client"
        _compile_client(client)
        archive = _collect(kernel_dir, client)
        out = Path(tmp) / "image"
        out.mkdir()
        with gzip.GzipFile(out / "initrd.gz", "wb", compresslevel=6, mtime=0) as gz:
            gz.write(archive.getvalue())
        manifest = {
            "kernel": (kernel_dir / "kver").read_text().strip(),
            "kernel_package": kernel_dir.name,
            "packages": _package_versions(),
            "build_version": BUILD_VERSION,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(image_dir, ignore_errors=True)
        out.rename(image_dir)


def _compile_client(target: Path) -> None:
    try:
        flags = _run(["pkg-config", "--cflags", "--libs", "libpcsclite"]).split()
    except GuestBuildError:
        flags = ["-I/usr/include/PCSC", "-pthread", "-lpcsclite"]
    _run(["gcc", "-O2", "-Wall", "-o", str(target), str(HERE / "client.c"), *flags])


def _collect(kernel_dir: Path, client: Path) -> CpioWriter:
    """Everything the guest's /init, pcscd, libccid and the client need."""
    cpio = CpioWriter()
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "root", "usr/bin", "usr/sbin", "sbin"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    busybox = _static_busybox()
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for module in MODULES:
        name = Path(module).name
        cpio.file(f"lib/modules/{name}", (kernel_dir / "modules" / name).read_bytes())
    pcscd = Path("/usr/sbin/pcscd")
    libccid = CCID_BUNDLE / "Contents/Linux/libccid.so"
    plist = CCID_BUNDLE / "Contents/Info.plist"
    for path in (pcscd, libccid, plist):
        if not path.exists():
            raise GuestBuildError(f"{path} is missing (install pcscd and libccid)")
    cpio.file(str(pcscd), pcscd.read_bytes(), 0o755)
    cpio.file(str(libccid), libccid.read_bytes(), 0o755)
    # Info.plist is a symlink to /etc/libccid_Info.plist: store the content.
    cpio.file(str(plist), plist.read_bytes())
    cpio.file("usr/bin/ccidt-client", client.read_bytes(), 0o755)
    for dest, src in _shared_libraries([pcscd, libccid, client]).items():
        cpio.file(dest, src.resolve().read_bytes(), 0o755)
    return cpio


def _static_busybox() -> Path:
    """/bin/busybox, which must be busybox-static (the dynamic one needs more libs)."""
    path = Path("/bin/busybox")
    if not path.exists():
        raise GuestBuildError("/bin/busybox is missing (apt-get install busybox-static)")
    head = path.read_bytes()[:8192]
    if b"/lib64/ld-linux" in head:
        raise GuestBuildError("/bin/busybox is dynamically linked: install busybox-static")
    return path


def _shared_libraries(binaries: list[Path]) -> dict[str, Path]:
    """Every library ``ldd`` lists, plus libgcc_s.so.1.

    Pitfall: glibc dlopens libgcc_s.so.1 at pthread_exit/pthread_cancel (for
    unwinding) and ldd does not list it; without it pcscd aborts with
    "libgcc_s.so.1 must be installed for pthread_exit to work".
    """
    found: dict[str, Path] = {}
    for binary in binaries:
        for line in _run(["ldd", str(binary)]).splitlines():
            match = re.search(r"(/\S+)\s+\(0x", line)
            if match:
                found[match.group(1)] = Path(match.group(1))
    gcc_s = _run(["gcc", "-print-file-name=libgcc_s.so.1"]).strip()
    candidates = [Path("/lib/x86_64-linux-gnu/libgcc_s.so.1"), Path(gcc_s)]
    libgcc = next((c for c in candidates if c.is_absolute() and c.exists()), None)
    if libgcc is None:
        raise GuestBuildError("libgcc_s.so.1 not found (it comes with libgcc-s1)")
    found["/lib/x86_64-linux-gnu/libgcc_s.so.1"] = libgcc
    return dict(sorted(found.items()))
