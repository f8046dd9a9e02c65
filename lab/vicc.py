"""Launch Debian's real vicc (vsmartcard's Python card emulator) as a process.

We keep vicc only as a "real emulator" smoke test next to our own card
(docs/lab.md#V9).  Quirks that shape this module:

* It must run through :mod:`lab.vicc_fixed` under Debian's
  ``/usr/bin/python3`` (install path, Crypto→Cryptodome, 44 ms Nagle stall).
* Only ``-t iso7816`` works; its ATR is ``3B 95 13 81 01 80 73 FF 01 00 0B``
  (T=1 only) and its PIN is 1234.
* Start it only after pcscd lists the readers: when vpcd's port is not up it
  logs "Connection refused" and exits with rc **0**, without retrying.
* It exits whenever pcscd stops; after a pcscd restart start a new one.
* Without ``-v`` its logging is CRITICAL, so errors would be silent; we pass
  ``-v`` (it then logs every APDU to its log file).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from lab.pcsc import CardState, LabError, PcscStack, ReaderSlot, wait_card_state
from lab.process import reap

SYSTEM_PYTHON = "/usr/bin/python3"
WRAPPER = Path(__file__).with_name("vicc_fixed.py")
VICC_ATR = bytes.fromhex("3B951381018073FF01000B")
VICC_PIN = b"1234"


class ViccProcess:
    """One vicc connected to one vpcd slot of a running :class:`PcscStack`."""

    def __init__(
        self,
        stack: PcscStack,
        slot: ReaderSlot | None = None,
        *,
        card_type: str = "iso7816",
        log_path: Path | str | None = None,
        verbose: bool = True,
    ) -> None:
        self.stack = stack
        self._claimed = slot is None
        self.slot = slot or stack.claim_slot()
        self.reader = self.slot.name
        self.port = self.slot.port
        self.card_type = card_type
        self.verbose = verbose
        self._log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None
        #: seconds from exec to PRESENT for the last start
        self.start_seconds: float | None = None

    @property
    def args(self) -> list[str]:
        a = [SYSTEM_PYTHON, str(WRAPPER), "-t", self.card_type, "-H", "127.0.0.1",
             "-P", str(self.port)]  # fmt: skip
        return a + (["-v"] if self.verbose else [])

    @property
    def log_path(self) -> Path:
        return self._log_path or self.stack.workdir / f"vicc-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 5.0) -> CardState:
        """Exec vicc and wait until pcscd reports the card PRESENT."""
        if not self.stack.running:
            raise LabError("start pcscd before vicc (vicc exits rc 0 when vpcd is not up)")
        if self.proc is not None:
            raise LabError("vicc already running")
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            state = self._wait_present(t0 + timeout)
        except BaseException:
            self.stop(wait_empty=False)
            raise
        self.start_seconds = time.monotonic() - t0
        return state

    def _wait_present(self, deadline: float) -> CardState:
        # Poll in short GetStatusChange slices so an early vicc exit is reported at once.
        while True:
            try:
                return wait_card_state(self.reader, True, min(0.25, deadline - time.monotonic()))
            except TimeoutError:
                pass
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise LabError(
                    f"vicc exited with rc {self.proc.returncode} before its card appeared; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"vicc card not PRESENT in {self.reader!r}")

    def stop(
        self, sig: int = signal.SIGTERM, *, wait_empty: bool = True, timeout: float = 5.0
    ) -> int | None:
        """Signal vicc by pid, reap it, and (if pcscd runs) wait until the reader is EMPTY."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        reap(proc, sig, timeout, cont=True)
        if wait_empty and self.stack.running:
            wait_card_state(self.reader, False, timeout)
        return proc.returncode

    def close(self) -> None:
        """Stop and give the slot back (if we claimed it)."""
        try:
            self.stop()
        except (TimeoutError, LabError):
            pass
        finally:
            if self._claimed:
                self.stack.release_slot(self.reader)
                self._claimed = False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ViccProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
