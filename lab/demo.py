"""``make demo``: a real guest reads a host card through ccidbridge.

Without ``--reader``: inside ``.ci/isolated`` it starts a private pcscd with
vsmartcard's virtual reader and Debian's vicc card emulator.  With
``--reader NAME``: the card in that reader of the machine's own pcscd.  Then,
in both cases: a one-card config, the devices ``ccidbridge libvirt`` and
``ccidbridge qemu-argv`` make of it, ``ccidbridge run``, a tiny Linux guest
under QEMU that reads the card (ATR and APDUs, through its own pcscd and
libccid), and finally the same APDUs sent to the card directly on the host,
side by side with what the guest got.  Everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from lab.bridgeproc import BridgeProcess, device_args, write_config

#: Read-only commands that any card answers somehow, and the PIN check of the
#: virtual card (its PIN is 1234; the bridge log shows it redacted).
VIRTUAL_APDUS = [
    ("SELECT MF", "00A4000C023F00"),
    ("VERIFY PIN 1234", "002000000431323334"),
    ("GET CHALLENGE (random)", "0084000008"),
    ("READ BINARY, no file", "00B0000010"),
    ("GET DATA", "00CA000000"),
]
REAL_APDUS = [
    ("SELECT PIV", "00A4040009A0000003080000100000"),
    ("SELECT MF", "00A4000C023F00"),
    ("GET DATA (CPLC)", "00CA9F7F00"),
    ("GET CHALLENGE (random)", "0084000008"),
]
RANDOM = "0084"


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text} " + "=" * max(0, 74 - len(text)))


def show_block(text: str, indent: str = "   ") -> None:
    for line in text.rstrip("\n").splitlines():
        say(indent + line)


def host_answers(reader: str, apdus: list[bytes]) -> tuple[bytes, list[bytes]]:
    """ATR and responses (empty where a transmit failed), straight to the card."""
    from lab.pcsc import HostConnection

    with HostConnection(reader) as conn:
        if conn.hr:
            raise SystemExit(f"demo: cannot connect to {reader!r} (PC/SC error 0x{conn.hr:08X})")
        return conn.atr(), [conn.tx(apdu)[1] for apdu in apdus]


def cli(*args: str) -> str:
    """Run a ccidbridge sub-command as a user would and return its output."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "ccidbridge", *args], capture_output=True, text=True, timeout=60
    )
    if proc.returncode:
        raise SystemExit(f"demo: ccidbridge {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def fmt(data: bytes, width: int = 30) -> str:
    text = data.hex(" ").upper() if data else "-"
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__)
    parser.add_argument("--reader", help="use the card in this reader of the machine's pcscd")
    args = parser.parse_args(argv)

    from ccidbridge.protocol.atr import hexatr
    from lab.guest import build_guest, start_guest

    started = time.monotonic()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="ccidbridge-demo-") as tmp:
        work = Path(tmp)
        heading("1. the host card")
        if args.reader:
            reader = args.reader
            apdus = REAL_APDUS
            say(f"   using the machine's pcscd and the card in {reader!r}")
        else:
            if os.environ.get("CCIDBRIDGE_ISOLATED") != "1":
                raise SystemExit("demo: run it as `make demo` (it needs the private namespace)")
            from lab.pcsc import PcscStack
            from lab.vicc import ViccProcess

            pcsc = stack.enter_context(PcscStack(1, workdir=work / "pcsc"))
            say(f"   private pcscd (pid {pcsc.pid}) with vsmartcard's virtual reader")
            vicc = ViccProcess(pcsc, log_path=work / "vicc.log")
            stack.callback(vicc.close)
            vicc.start()
            reader = vicc.reader
            apdus = VIRTUAL_APDUS
            say(f"   vicc (pid {vicc.pid}), Debian's ISO 7816 card emulator, in {reader!r}")

        heading("2. the config, and what it gives libvirt and QEMU")
        socket_path = work / "vm1.sock"
        config = write_config(work / "vm1.xml", socket_path, reader)
        show_block(config.read_text())
        say("   $ ccidbridge libvirt vm1.xml   # paste into the domain's <devices>")
        show_block(cli("libvirt", str(config)), "     ")
        say("   $ ccidbridge qemu-argv --usb vm1.xml")
        show_block(cli("qemu-argv", "--usb", str(config)), "     ")

        heading("3. the guest reads the card through `ccidbridge run -v`")
        image = build_guest()
        bridge = stack.enter_context(BridgeProcess(config, work / "bridge.log", verbose=1))
        say(f"   bridge pid {bridge.pid}; booting the guest (Debian kernel {image.kernel_version},")
        say("   pcscd + libccid in an initramfs) under QEMU with those arguments ...")
        guest = stack.enter_context(
            start_guest(image, device_args(config), apdus=[h for _, h in apdus], timeout=60)
        )
        run = guest.result()
        bridge.stop(signal.SIGTERM)
        say("   bridge log:")
        show_block(bridge.text().replace(str(work) + "/", ""), "     ")
        if run.atr is None or len(run.apdus) != len(apdus):
            say("   the guest did not finish; its console:")
            show_block(run.console_tail(40), "     ")
            return 1

        heading("4. the same APDUs, straight to the card on the host")
        host_atr, host = host_answers(reader, [bytes.fromhex(h) for _, h in apdus])

        heading("5. side by side")
        say(f"   ATR in the guest  {hexatr(run.atr)}")
        say(f"   ATR on the host   {hexatr(host_atr)}")
        if run.atr != host_atr:
            say("   (the ATR differs only where the bridge made it announce T=0 for QEMU's")
            say("    T=0-only reader; see the bridge log above)")
        say()
        say(f"   {'APDU':24}{'in the guest':33}{'on the host':33}")
        same = 0
        for (name, _), got, want in zip(apdus, run.apdus, host, strict=True):
            guest_resp = got.response if got.rv == 0 else b""
            if name.endswith("(random)"):
                ok = len(guest_resp) == len(want) and guest_resp[-2:] == want[-2:]
            else:
                ok = guest_resp == want
            same += ok
            mark = "same" if ok else "DIFFERENT"
            say(f"   {name:24}{fmt(guest_resp):33}{fmt(want):33}{mark}")
        say()
        say(f"   {same}/{len(apdus)} answers identical (random ones: same length and status)")
        say(f"   done in {time.monotonic() - started:.1f} s; stopping everything we started")
        return 0 if same == len(apdus) else 1


if __name__ == "__main__":
    sys.exit(main())
