"""The lab's guest as a libvirt domain whose USB CCID reader may come and go.

lab/guest's /init waits once for the reader and then starts pcscd, because
without udevd pcscd only sees readers present when it starts.  The lifecycle
tests plug the reader in while the guest runs and pull it out again, so
:func:`cycling_initrd` appends a replacement /init to the guest's initrd (the
kernel unpacks concatenated archives in order; a later file replaces an
earlier one): ``cycles=N`` times, wait for the reader, start pcscd, run the
client's steps, wait until the reader is gone (``CCIDT init usb-gone n=I``),
stop pcscd.

:func:`domain_xml` boots it under libvirt (kernel + initrd, q35, qemu-xhci,
the serial console to a file), and :class:`Console` follows that file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from lab.guest.boot import GuestError, GuestRun, GuestTimeout, Record, kernel_append, parse_line
from lab.guest.build import GuestImage
from lab.guest.cpio import CpioWriter

CYCLING_INIT = r"""#!/bin/sh
# /init of the lifecycle tests' guest: the CCID reader is hot-plugged (lab/vm.py).
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /usr/bin /usr/sbin /sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
for f in /ccidt/env/*; do [ -f "$f" ] && export "${f##*/}=$(cat "$f")"; done
say() { echo "CCIDT init $* t=$(cut -d' ' -f1 /proc/uptime)"; }
( sleep "${guest_timeout:-60}"; say timeout; poweroff -f ) &
say start kernel=$(uname -r)
for m in usb-common usbcore xhci-hcd xhci-pci; do
    insmod "/lib/modules/$m.ko" || say "insmod-failed $m"
done
reader() {
    for d in /sys/bus/usb/devices/*; do
        [ "$(cat "$d/idVendor" 2>/dev/null):$(cat "$d/idProduct" 2>/dev/null)" = 08e6:4433 ] \
            && return 0
    done
    return 1
}
n=0
while [ "$n" -lt "${cycles:-1}" ]; do
    n=$((n + 1))
    say waiting-usb n=$n
    until reader; do sleep 0.05; done
    say usb-ready n=$n
    /usr/sbin/pcscd -f -i > /tmp/pcscd.log 2>&1 &
    pcscd=$!
    /usr/bin/ccidt-client
    say client-exit n=$n rc=$?
    while reader; do sleep 0.05; done
    say usb-gone n=$n
    kill "$pcscd"; wait "$pcscd"
done
say poweroff
poweroff -f
"""


def cycling_initrd(image: GuestImage, directory: Path, env: Mapping[str, str]) -> Path:
    """The guest's initrd with :data:`CYCLING_INIT` as /init and ``env`` as
    ``/ccidt/env/NAME`` files (exported by /init: the client reads ``steps``)."""
    cpio = CpioWriter()
    cpio.file("init", CYCLING_INIT.encode(), 0o755)
    for name, value in env.items():
        cpio.file(f"ccidt/env/{name}", value.encode())
    base = image.initrd.read_bytes()
    path = directory / "initrd-cycling.gz"
    path.write_bytes(base + b"\0" * (-len(base) % 4) + cpio.getvalue())
    return path


def domain_xml(name: str, image: GuestImage, initrd: Path, console: Path, *,
               cycles: int = 1, guest_timeout: float = 110, usb: str = "qemu-xhci",
               devices: str = "", metadata: str = "") -> str:
    """A transient-ready domain booting the guest: TCG, q35, one USB controller
    (``usb='none'`` for none), the console in ``console``.

    ``-cpu max`` of lab/guest is not a libvirt CPU model; qemu64 + rdrand gives
    the guest's pcscd its entropy the same way.
    """
    cmdline = kernel_append(guest_timeout=guest_timeout, params={"cycles": cycles})
    meta = f"<metadata>{metadata}</metadata>" if metadata else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  {meta}
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(image.vmlinux))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <cpu mode='custom' match='exact'><model>qemu64</model>
    <feature policy='require' name='rdrand'/></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model={quoteattr(usb)}/>
    <serial type='file'><source path={quoteattr(str(console))}/></serial>
{devices}
  </devices>
</domain>
"""


@dataclass
class Console:
    """The guest's serial console file, parsed into ``CCIDT`` records as it grows."""

    path: Path

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.records: list[Record] = []
        self.lines: list[str] = []
        self._offset = 0
        self._partial = b""
        self._cursor = 0

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *done, self._partial = (self._partial + data).split(b"\n")
        for raw in done:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.lines.append(line)
            rec = parse_line(line, time.monotonic() - self.started, len(self.records))
            if rec is not None:
                self.records.append(rec)

    def wait_for(self, prefix: str, timeout: float = 60.0) -> Record:
        """The next record (after the last match) whose ``kind text`` starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            while self._cursor < len(self.records):
                rec = self.records[self._cursor]
                self._cursor += 1
                if f"{rec.kind} {rec.text}".startswith(prefix):
                    return rec
                if rec.kind == "init" and rec.text.startswith("timeout"):
                    raise GuestError(f"guest timed out before {prefix!r}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise GuestTimeout(f"no {prefix!r} within {timeout} s\n{self.tail()}")
            time.sleep(0.05)

    def run_since(self, start: int) -> GuestRun:
        """The records from index ``start`` on, parsed as one client run."""
        self._read()
        return GuestRun(lines=list(self.lines), records=self.records[start:],
                        returncode=None, timed_out=False,
                        wall_seconds=time.monotonic() - self.started)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])
