"""A private pcscd with vsmartcard's vpcd readers, for tests, demo and benchmarks.

Why it looks like this (docs/lab.md#V1 .. #V4):

* pcscd's socket is fixed at ``/run/pcscd/pcscd.comm``; there can be only one
  pcscd per mount namespace.  We therefore refuse to start unless
  ``CCIDBRIDGE_ISOLATED=1`` (set by ``.ci/isolated``, which gives us a private
  tmpfs on /run), so we can never clobber the machine's own pcscd.
* ``pcscd -c DIR`` replaces ``/etc/reader.conf.d``: we write our own vpcd
  entries into a temp dir and never touch /etc.  Each entry gives 2 slots,
  ``NAME 00 00`` on TCP ``port`` and ``NAME 00 01`` on ``port + 1``; each entry
  needs a distinct FRIENDLYNAME (duplicates give duplicate reader names).
* ``--foreground`` keeps logs on stdout (there is no syslog); never
  ``--auto-exit`` (it quits after 60 s without clients).
* New config entries need a pcscd restart (``pcscd -H`` does nothing here), and
  every card must reconnect after a restart (vpcd's sockets die with pcscd).
* Readiness is polled with the PC/SC API itself (SCardListReaders), not with a
  subprocess, because that is exactly what clients need.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from smartcard import scard

from ccidbridge.card.listing import PcscUnavailable, reader_names
from lab.process import reap
from lab.vpcd_card import (
    DEFAULT_ATR,
    Behaviour,
    CardLogic,
    CardProcess,
    VpcdCard,
    parse_atr,
)

PCSCD = "/usr/sbin/pcscd"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
PCSCD_PIDFILE = Path("/run/pcscd/pcscd.pid")
#: vpcd's default port (0x8C7B); the system config uses it for "Virtual PCD".
DEFAULT_BASE_PORT = 35963
SLOTS_PER_ENTRY = 2
DEFAULT_NAME = "Virtual PCD"


class LabError(RuntimeError):
    """The lab could not be set up as asked (clear message, no traceback hunt)."""


def require_isolated() -> None:
    """Refuse to run daemons outside ``.ci/isolated`` (they would hit the host's /run)."""
    if os.environ.get("CCIDBRIDGE_ISOLATED") != "1":
        raise LabError(
            "refusing to start pcscd outside the private namespace: its socket is fixed at "
            "/run/pcscd/pcscd.comm and would clash with the machine's own pcscd. "
            "Run under .ci/isolated (which sets CCIDBRIDGE_ISOLATED=1)."
        )
    # Belt and braces: the variable could leak into a non-isolated shell.
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            private_run = any(" /run " in line and "ccidbridge-run" in line for line in f)
    except OSError:
        private_run = False
    if not private_run:
        raise LabError(
            "CCIDBRIDGE_ISOLATED=1 but /run is not .ci/isolated's private tmpfs; "
            "refusing to start pcscd"
        )


@dataclass(frozen=True)
class ReaderSlot:
    """One vpcd slot as PC/SC clients see it, and the TCP port its card connects to."""

    name: str
    port: int
    entry: int
    slot: int


def entry_name(index: int, base: str = DEFAULT_NAME) -> str:
    """FRIENDLYNAME of config entry ``index``: "Virtual PCD", "Virtual PCD B", "… C"."""
    if index == 0:
        return base
    if index > 25:
        raise LabError("at most 26 vpcd config entries")
    return f"{base} {chr(ord('A') + index)}"


def vpcd_slots(n_entries: int, base_port: int = DEFAULT_BASE_PORT) -> list[ReaderSlot]:
    """Reader names and ports for ``n_entries`` vpcd entries (2 slots each).

    Entry ``i`` listens on ``base_port + 2*i`` (slot 00) and ``+1`` (slot 01).
    """
    slots = []
    for i in range(n_entries):
        name = entry_name(i)
        for s in range(SLOTS_PER_ENTRY):
            slots.append(
                ReaderSlot(f"{name} 00 {s:02d}", base_port + SLOTS_PER_ENTRY * i + s, i, s)
            )
    return slots


def write_reader_conf(directory: Path, slots: list[ReaderSlot], driver_dir: Path) -> None:
    """One reader.conf.d file per vpcd entry.  ``/dev/null:PORT`` makes vpcd listen on PORT.

    Every entry after the first gets its *own copy* of libifdvpcd.so: vpcd 3.3
    keeps its per-slot state in a global array indexed by ``Lun & 0xffff``
    (the slot number only), so two entries sharing one loaded driver overwrite
    each other's slot 0/1 (entry B's listener replaces entry A's, and reader
    "…PCD 00 00" never sees its card).  glibc dedups dlopen by inode, so a
    symlink is not enough; a real copy is (docs/lab.md#V2).
    """
    directory.mkdir(parents=True, exist_ok=True)
    driver_dir.mkdir(parents=True, exist_ok=True)
    for s in slots:
        if s.slot:
            continue
        lib = Path(VPCD_DRIVER)
        if s.entry:
            lib = driver_dir / f"libifdvpcd-{s.entry:02d}.so"
            if not lib.exists():
                shutil.copyfile(VPCD_DRIVER, lib)
        name = s.name.rsplit(" 00 ", 1)[0]
        (directory / f"vpcd-{s.entry:02d}").write_text(
            f'FRIENDLYNAME "{name}"\n'
            f"DEVICENAME   /dev/null:0x{s.port:04X}\n"
            f"LIBPATH      {lib}\n"
            f"CHANNELID    0x{s.port:04X}\n"
        )




class PcscError(LabError):
    def __init__(self, hresult: int) -> None:
        self.hresult = hresult & 0xFFFFFFFF
        super().__init__(f"PC/SC error 0x{self.hresult:08X}")


class HostConnection:
    """Another program on the host: a plain low-level PC/SC session on ``reader``.

    The yardstick for what the bridge relays (tests, the demo) and the
    "other host program" of sharing tests.  A session that could not connect
    (e.g. the bridge holds the card exclusively) is still made: ``hr`` is
    SCardConnect's result, and :meth:`tx` refuses to use a handle that was
    never granted (pyscard crashes on hcard 0, docs/lab.md#V8).  The card is left
    as it is on close (SCARD_LEAVE_CARD).
    """

    def __init__(
        self,
        reader: str,
        share: int = scard.SCARD_SHARE_SHARED,
        protocol: int = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
    ) -> None:
        hr, self.ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hr != scard.SCARD_S_SUCCESS:
            raise PcscError(hr)
        hr, self.h, self.proto = scard.SCardConnect(self.ctx, reader, share, protocol)
        self.hr = hr & 0xFFFFFFFF

    def tx(self, apdu: bytes | str) -> tuple[int, bytes]:
        """SCardTransmit: (hresult, response); the response only means something on 0."""
        if self.hr != scard.SCARD_S_SUCCESS:
            raise PcscError(self.hr)
        if isinstance(apdu, str):
            apdu = bytes.fromhex(apdu)
        hr, resp = scard.SCardTransmit(self.h, self.proto, list(apdu))
        hr &= 0xFFFFFFFF
        return hr, bytes(resp) if hr == scard.SCARD_S_SUCCESS else b""

    def ok(self, apdu: bytes | str) -> bytes:
        """The response, or PcscError when the transmit failed."""
        hr, resp = self.tx(apdu)
        if hr != scard.SCARD_S_SUCCESS:
            raise PcscError(hr)
        return resp

    def atr(self) -> bytes:
        if self.hr != scard.SCARD_S_SUCCESS:
            raise PcscError(self.hr)
        hr, _, _, _, atr = scard.SCardStatus(self.h)
        if hr != scard.SCARD_S_SUCCESS:
            raise PcscError(hr)
        return bytes(atr)

    def close(self) -> None:
        if self.hr == scard.SCARD_S_SUCCESS:
            scard.SCardDisconnect(self.h, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(self.ctx)

    def __enter__(self) -> HostConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def direct_transmit(reader: str, apdus: list[bytes]) -> list[bytes]:
    """The APDUs straight to the card, shared, T=0 or T=1 as pcscd picks."""
    with HostConnection(reader) as conn:
        return [conn.ok(apdu) for apdu in apdus]


def _pidfile_pid() -> int | None:
    """The pid in pcscd's pid file (it ends in a NUL, docs/lab.md#V1), if that process lives."""
    try:
        pid = int(PCSCD_PIDFILE.read_bytes().strip(b"\0\n ") or b"0")
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
    except OSError:
        return None
    return pid


@dataclass(frozen=True)
class CardState:
    """Result of :func:`wait_card_state`: raw event state, ATR, and when it was seen."""

    present: bool
    event_state: int
    atr: bytes
    elapsed: float

    @property
    def event_count(self) -> int:
        return (self.event_state >> 16) & 0xFFFF


def wait_card_state(reader: str, present: bool, timeout: float = 5.0) -> CardState:
    """Block (SCardGetStatusChange, no sleeps) until ``reader`` has / lacks a card.

    pcscd polls vpcd slots every 400 ms (docs/lab.md#V4), so detection takes up to
    about 0.4 s either way.  Raises ``TimeoutError`` after ``timeout`` s.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        raise PcscError(hr)
    try:
        current = scard.SCARD_STATE_UNAWARE
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            hr, states = scard.SCardGetStatusChange(ctx, left_ms, [(reader, current)])
            if hr == scard.SCARD_E_TIMEOUT:
                raise TimeoutError(
                    f"{reader!r}: card {'not present' if present else 'still present'} "
                    f"after {timeout:.1f} s"
                )
            if hr != scard.SCARD_S_SUCCESS:
                raise PcscError(hr)
            _, event, atr = states[0]
            if event & scard.SCARD_STATE_UNKNOWN:
                raise LabError(f"unknown reader {reader!r}")
            is_present = bool(event & scard.SCARD_STATE_PRESENT) and not (
                event & scard.SCARD_STATE_MUTE
            )
            if is_present == present:
                return CardState(is_present, event, bytes(atr), time.monotonic() - t0)
            # Ask again with what we now know; the CHANGED bit must not be echoed back.
            current = event & ~scard.SCARD_STATE_CHANGED
    finally:
        scard.SCardReleaseContext(ctx)


class PcscStack:
    """pcscd in the foreground with ``n_entries`` vpcd config entries (2 slots each).

    Use as a context manager.  ``slots`` lists every reader slot with its port.
    Logs go to ``log_path`` (``pcscd --debug`` output; appended across restarts).
    """

    def __init__(
        self,
        n_entries: int = 2,
        *,
        base_port: int = DEFAULT_BASE_PORT,
        workdir: Path | str | None = None,
        debug: bool = True,
        start_timeout: float = 10.0,
    ) -> None:
        if n_entries < 1:
            raise ValueError("need at least one vpcd entry")
        self.n_entries = n_entries
        self.base_port = base_port
        self.debug = debug
        self.start_timeout = start_timeout
        self._own_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._workdir = Path(workdir) if workdir is not None else None
        self.slots: list[ReaderSlot] = vpcd_slots(n_entries, base_port)
        self.proc: subprocess.Popen[bytes] | None = None
        #: seconds from exec to all readers listed, for the last start
        self.start_seconds: float | None = None
        self._claimed: set[str] = set()
        self._cards: list[InsertedCard] = []
        self._lock = threading.Lock()

    @property
    def workdir(self) -> Path:
        """Config, driver copies and logs; a temp dir (made on first use) unless given."""
        if self._workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="ccidbridge-pcsc-")
            self._workdir = Path(self._own_tmp.name)
        return self._workdir

    @property
    def confdir(self) -> Path:
        return self.workdir / "reader.conf.d"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pcscd.log"

    # -- reader bookkeeping -------------------------------------------------
    @property
    def readers(self) -> list[str]:
        return [s.name for s in self.slots]

    def slot(self, reader: str) -> ReaderSlot:
        for s in self.slots:
            if s.name == reader:
                return s
        raise KeyError(reader)

    def port(self, reader: str) -> int:
        """TCP port a card must connect to for ``reader``."""
        return self.slot(reader).port

    def claim_slot(self) -> ReaderSlot:
        """Reserve a slot nobody in this process uses yet (for card fixtures)."""
        with self._lock:
            for s in self.slots:
                if s.name not in self._claimed:
                    self._claimed.add(s.name)
                    return s
        raise LabError(
            f"all {len(self.slots)} vpcd slots are in use; call ensure_slots(n) for more"
        )

    def release_slot(self, reader: str) -> None:
        with self._lock:
            self._claimed.discard(reader)

    # -- lifecycle ----------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> PcscStack:
        """Write the config, exec pcscd, and wait until every reader is listed."""
        require_isolated()
        if self.running:
            return self
        other = _pidfile_pid()
        if other is not None:
            raise LabError(f"another pcscd (pid {other}) is running in this namespace")
        for d in (self.confdir,):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
        write_reader_conf(self.confdir, self.slots, self.workdir / "drivers")
        args = [PCSCD, "--foreground", "-c", str(self.confdir)]
        if self.debug:
            args.append("--debug")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            log.write(f"==== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        try:
            self._wait_readers(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_readers(self, t0: float) -> None:
        want = set(self.readers)
        last: object = None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(
                    f"pcscd exited with rc {self.proc.returncode}; log:\n{self.log_tail()}"
                )
            try:
                have = set(reader_names())
                if want <= have:
                    return
                last = sorted(have)
            except PcscUnavailable as exc:  # NO_SERVICE until the socket is up
                last = exc
            if time.monotonic() - t0 > self.start_timeout:
                raise LabError(
                    f"pcscd readers not listed after {self.start_timeout} s "
                    f"(last: {last}); log:\n{self.log_tail()}"
                )
            time.sleep(0.002)

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
        """Signal pcscd by pid (SIGTERM: it exits in ~2 ms) and reap it; SIGKILL if it lingers.

        ``sig=SIGKILL`` simulates a pcscd crash: socket and pid file stay
        behind, which the next start tolerates (docs/lab.md#V1).
        """
        proc, self.proc = self.proc, None
        reap(proc, sig, timeout)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL pcscd (a crash, as far as its clients can tell) and reap it."""
        self.stop(timeout, signal.SIGKILL)

    def restart(self, *, reinsert: bool = False, sig: int = signal.SIGTERM) -> None:
        """Stop (with ``sig``) and start pcscd with the same config.

        Every PC/SC context from before is dead afterwards (SCARD_E_NO_SERVICE
        even though SCardIsValidContext says OK, docs/lab.md#V3), and every card has
        been disconnected (vpcd's sockets close with pcscd; our card process
        exits on EOF, like vicc).  ``reinsert=True`` restarts every card that
        :meth:`insert_card` made and waits until each is PRESENT again;
        otherwise call ``card.restart()`` yourself.
        """
        cards = [c for c in self._cards if c.card is not None] if reinsert else []
        self.stop(sig=sig)
        for c in cards:
            c.remove(wait=False)
        self.start()
        for c in cards:
            c.insert()

    def ensure_slots(self, n_slots: int) -> None:
        """Grow to at least ``n_slots`` slots.

        Restarts pcscd if it must grow (new entries need a restart; ``pcscd -H``
        does not rescan reader.conf.d, docs/lab.md#V2) and re-inserts our cards.
        """
        need = -(-n_slots // SLOTS_PER_ENTRY)
        if need <= self.n_entries:
            return
        was_running = self.running
        cards = [c for c in self._cards if c.card is not None]
        self.stop()
        for c in cards:
            c.remove(wait=False)
        self.n_entries = need
        self.slots = vpcd_slots(need, self.base_port)
        if was_running:
            self.start()
            for c in cards:  # existing slots keep their names and ports
                c.insert()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        self.stop()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None
            self._workdir = None

    def __enter__(self) -> PcscStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_card_state(self, reader: str, present: bool, timeout: float = 5.0) -> CardState:
        return wait_card_state(reader, present, timeout)

    def insert_card(
        self,
        atr: bytes | str = DEFAULT_ATR,
        behaviour: Behaviour | None = None,
        *,
        reader: str | None = None,
        process: bool = True,
        wait: bool = True,
        timeout: float = 5.0,
    ) -> InsertedCard:
        """Start our vpcd test card on a free slot (or ``reader``) and wait until PRESENT.

        ``process=True`` runs it as a child process (needed for SIGSTOP/SIGKILL
        tests); ``False`` runs it on a thread in this process (cheaper).
        Call ``.close()`` on the result (fixtures do) to remove it and free the slot.
        """
        if reader is None:
            slot = self.claim_slot()
        else:
            slot = self.slot(reader)
            with self._lock:
                if slot.name in self._claimed:
                    raise LabError(f"{reader!r} already has a card from this lab")
                self._claimed.add(slot.name)
        card = InsertedCard(
            self,
            slot,
            parse_atr(atr) if isinstance(atr, str) else atr,
            behaviour or Behaviour(),
            process=process,
        )
        try:
            card.insert(wait=wait, timeout=timeout)
        except BaseException:
            card.close()
            raise
        with self._lock:
            self._cards.append(card)
        return card

    def _forget(self, card: InsertedCard) -> None:
        with self._lock:
            self._claimed.discard(card.reader)
            if card in self._cards:
                self._cards.remove(card)


class InsertedCard:
    """Our test card in one vpcd slot: insert/remove/kill/SIGSTOP it like a real card.

    Removal is only *seen* by pcscd at its next 400 ms poll (docs/lab.md#V4), so
    ``remove(wait=True)`` blocks until the reader is EMPTY; otherwise the next
    card in this slot could be mistaken for "present" on the stale state.
    """

    def __init__(
        self,
        stack: PcscStack,
        slot: ReaderSlot,
        atr: bytes,
        behaviour: Behaviour,
        *,
        process: bool = True,
    ) -> None:
        self.stack = stack
        self.slot = slot
        self.reader = slot.name
        self.port = slot.port
        self.atr = atr
        self.behaviour = behaviour
        self.process = process
        self.card: CardProcess | VpcdCard | None = None
        self._closed = False
        #: :class:`CardState` of the last successful insert (ATR, time to PRESENT)
        self.inserted_state: CardState | None = None

    @property
    def pid(self) -> int | None:
        return self.card.pid if isinstance(self.card, CardProcess) else None

    @property
    def logic(self) -> CardLogic:
        """The in-process card's state (only for ``process=False``)."""
        if not isinstance(self.card, VpcdCard):
            raise LabError("card state is only visible for in-process cards")
        return self.card.logic

    def insert(self, *, wait: bool = True, timeout: float = 5.0) -> CardState | None:
        if self.card is not None:
            raise LabError(f"{self.reader!r}: card already inserted")
        if self._stale_present():
            wait_card_state(self.reader, False, timeout)
        if self.process:
            log = self.stack.workdir / f"card-{self.port}.log"
            self.card = CardProcess(
                self.port, atr=self.atr, behaviour=self.behaviour, log_path=log
            ).start()
        else:
            self.card = VpcdCard(self.port, atr=self.atr, behaviour=self.behaviour).start()
        if not wait:
            return None
        self.inserted_state = wait_card_state(self.reader, True, timeout)
        return self.inserted_state

    def _stale_present(self) -> bool:
        """Is pcscd still showing a card from before (its removal not polled yet)?"""
        try:
            hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if hr != scard.SCARD_S_SUCCESS:
                return False
            try:
                hr, st = scard.SCardGetStatusChange(
                    ctx, 0, [(self.reader, scard.SCARD_STATE_UNAWARE)]
                )
            finally:
                scard.SCardReleaseContext(ctx)
        except Exception:  # noqa: BLE001 - best effort probe
            return False
        return hr == scard.SCARD_S_SUCCESS and bool(st[0][1] & scard.SCARD_STATE_PRESENT)

    def remove(
        self, *, sig: int = signal.SIGTERM, wait: bool = True, timeout: float = 5.0
    ) -> CardState | None:
        """Stop the card (``sig`` for the process form) and, if ``wait``, until EMPTY."""
        card, self.card = self.card, None
        if card is None:
            return None
        if isinstance(card, CardProcess):
            card.stop(sig)
        else:
            card.stop()
        if wait and self.stack.running:
            return wait_card_state(self.reader, False, timeout)
        return None

    #: alias: "stop the card" is "pull it out of the reader"
    stop = remove

    def kill(self, *, wait: bool = True, timeout: float = 5.0) -> CardState | None:
        return self.remove(sig=signal.SIGKILL, wait=wait, timeout=timeout)

    def _proc(self) -> CardProcess:
        if not isinstance(self.card, CardProcess):
            raise LabError("signals need a card started with process=True")
        return self.card

    def sigstop(self) -> None:
        """Freeze the card process: APDUs to it block forever in pcscd (docs/lab.md#V7)."""
        self._proc().sigstop()

    def sigcont(self) -> None:
        self._proc().sigcont()

    def restart(self, *, wait: bool = True, timeout: float = 5.0) -> CardState | None:
        """Remove and re-insert (also the way back after a pcscd restart)."""
        self.remove(wait=wait, timeout=timeout)
        return self.insert(wait=wait, timeout=timeout)

    def close(self) -> None:
        """Remove (waiting for EMPTY when pcscd runs) and free the slot.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.remove(wait=True)
        except (TimeoutError, LabError):
            pass
        finally:
            self.stack._forget(self)

    def __enter__(self) -> InsertedCard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DEFAULT_BASE_PORT",
    "CardState",
    "InsertedCard",
    "LabError",
    "PcscError",
    "PcscStack",
    "ReaderSlot",
    "vpcd_slots",
    "reader_names",
    "require_isolated",
    "wait_card_state",
    "write_reader_conf",
]
