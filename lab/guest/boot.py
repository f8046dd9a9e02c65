"""Boot the test guest under QEMU and parse what its client prints.

``boot_guest`` runs one guest to the end and returns a :class:`GuestRun`;
``start_guest`` returns a :class:`GuestHandle` whose console can be followed
line by line while the test acts on the host (``wait_for``), e.g. removes the
card once the guest printed ``CCIDT step ... wait-remove``.

Every wait has a timeout and QEMU is killed by PID at the host deadline by a
watchdog timer, even if the caller never asks for the result.  The guest has
its own deadline too (``guest_timeout=``, a little shorter), so it normally
powers itself off first and the console is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab.guest.build import GuestImage
from lab.guest.cpio import CpioWriter

QEMU = os.environ.get("CCIDBRIDGE_QEMU", "qemu-system-x86_64")
PREFIX = "CCIDT "
#: x86 COMMAND_LINE_SIZE: longer command lines are cut silently by the kernel.
COMMAND_LINE_MAX = 2047
BASE_APPEND = ("console=ttyS0", "quiet", "panic=-1")
_LINE = re.compile(r"CCIDT (\S+) ?(.*)$")
_FIELD = re.compile(r"(\w+)=(\S*)")


class GuestError(RuntimeError):
    """The guest did not do what was expected; the message ends with the console tail."""


class GuestTimeout(GuestError, TimeoutError):
    """A ``wait_for`` or the whole run ran out of time."""


class CommandLineTooLong(ValueError):
    """The kernel command line would exceed :data:`COMMAND_LINE_MAX`."""


@dataclass(frozen=True)
class Record:
    """One ``CCIDT <kind> <text>`` console line."""

    kind: str
    text: str
    #: Seconds since QEMU was started, on the host clock.
    host_t: float
    index: int

    @property
    def fields(self) -> dict[str, str]:
        """The ``key=value`` words of the line (``name=`` of a reader: rest of line)."""
        if self.kind == "reader":
            head, _, name = self.text.partition("name=")
            found = dict(_FIELD.findall(head))
            found["name"] = name
            return found
        return dict(_FIELD.findall(self.text))

    @property
    def guest_t(self) -> float | None:
        """The guest's CLOCK_MONOTONIC in ms (``t=``), when the line has one."""
        value = self.fields.get("t")
        if value is None:
            return None
        # /init prints seconds from /proc/uptime, the client milliseconds.
        return float(value) * 1000.0 if self.kind == "init" else float(value)

    @property
    def line(self) -> str:
        """The line as printed, from the prefix on."""
        return f"{PREFIX}{self.kind} {self.text}".rstrip()


@dataclass(frozen=True)
class ApduExchange:
    """``CCIDT apdu <cmd> -> <resp> rv=0x... ms=...``."""

    command: bytes
    response: bytes
    rv: int
    ms: float
    guest_t: float | None
    host_t: float

    @property
    def sw(self) -> bytes:
        """The status word (last two response bytes), or b"" without one."""
        return self.response[-2:] if len(self.response) >= 2 else b""

    @property
    def guest_timed_out(self) -> bool:
        """The guest's own watchdog (``guest_timeout=``) powered it off."""
        return any(r.text.startswith("timeout") for r in self.of_kind("init"))

    @property
    def ok(self) -> bool:
        """SCardTransmit succeeded and returned at least SW1 SW2."""
        return self.rv == 0 and len(self.response) >= 2


@dataclass(frozen=True)
class StateEvent:
    """``CCIDT state <flags> t=... count=... event=0x... [atr=...]``."""

    flags: frozenset[str]
    count: int
    event: int
    atr: bytes | None
    guest_t: float | None
    host_t: float

    @property
    def present(self) -> bool:
        """A card is in the reader."""
        return "present" in self.flags

    @property
    def empty(self) -> bool:
        """The reader is empty."""
        return "empty" in self.flags


def parse_line(line: str, host_t: float, index: int) -> Record | None:
    """The record in one console line, or None.

    The prefix is searched anywhere in the line: kernel messages or pcscd's
    output can land in the middle of a line on the shared console.
    """
    start = line.find(PREFIX)
    if start < 0:
        return None
    match = _LINE.match(line[start:].rstrip())
    if not match:
        return None
    return Record(kind=match.group(1), text=match.group(2), host_t=host_t, index=index)


def _apdu(record: Record) -> ApduExchange:
    cmd, _, rest = record.text.partition(" -> ")
    resp = rest.split(" ", 1)[0]
    fields = record.fields
    return ApduExchange(
        command=bytes.fromhex(cmd),
        response=b"" if resp == "-" else bytes.fromhex(resp),
        rv=int(fields.get("rv", "0x0"), 16),
        ms=float(fields.get("ms", "nan")),
        guest_t=record.guest_t,
        host_t=record.host_t,
    )


def _state(record: Record) -> StateEvent:
    fields = record.fields
    atr = fields.get("atr")
    return StateEvent(
        flags=frozenset(record.text.split(" ", 1)[0].split("|")),
        count=int(fields.get("count", "0")),
        event=int(fields.get("event", "0x0"), 16),
        atr=bytes.fromhex(atr) if atr else None,
        guest_t=record.guest_t,
        host_t=record.host_t,
    )


@dataclass
class GuestRun:
    """Everything one guest run printed, parsed."""

    lines: list[str]
    records: list[Record]
    returncode: int | None
    timed_out: bool
    wall_seconds: float
    stderr: str = ""
    argv: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Record]:
        """All records of one kind (``apdu``, ``state``, ``mark``, ``pcscd`` ...)."""
        return [r for r in self.records if r.kind == kind]

    @property
    def atrs(self) -> list[bytes]:
        """Every ATR the client printed (after each wait-card / wait-insert)."""
        return [bytes.fromhex(r.text.split(" ", 1)[0]) for r in self.of_kind("atr")]

    @property
    def atr(self) -> bytes | None:
        """The first ATR, or None."""
        return self.atrs[0] if self.atrs else None

    @property
    def apdus(self) -> list[ApduExchange]:
        """The APDU exchanges in order."""
        return [_apdu(r) for r in self.of_kind("apdu")]

    @property
    def states(self) -> list[StateEvent]:
        """Every reader state change the client saw."""
        return [_state(r) for r in self.of_kind("state")]

    @property
    def reader(self) -> str | None:
        """The PC/SC name of the guest's reader."""
        found = self.of_kind("reader")
        return found[0].fields["name"] if found else None

    @property
    def errors(self) -> list[str]:
        """The client's ``error`` lines."""
        return [r.text for r in self.of_kind("error")]

    @property
    def pcscd_log(self) -> list[str]:
        """pcscd's log lines (only with ``pcscd_log=1`` or ``2``)."""
        return [r.text for r in self.of_kind("pcscd")]

    @property
    def client_rc(self) -> int | None:
        """The ``rc`` of ``CCIDT done``, None if the client never finished."""
        done = self.of_kind("done")
        return int(done[-1].fields.get("rc", "-1")) if done else None

    @property
    def guest_timed_out(self) -> bool:
        """The guest's own watchdog (``guest_timeout=``) powered it off."""
        return any(r.text.startswith("timeout") for r in self.of_kind("init"))

    @property
    def ok(self) -> bool:
        """The client finished every step and the guest powered off by itself."""
        return self.client_rc == 0 and not self.timed_out and self.returncode == 0

    def first_host_t(self, kind: str) -> float | None:
        """Host seconds from QEMU start to the first record of ``kind``."""
        found = self.of_kind(kind)
        return found[0].host_t if found else None

    def console_tail(self, n: int = 60) -> str:
        """The last ``n`` console lines plus QEMU's stderr, for error messages."""
        tail = "\n".join(self.lines[-n:])
        return f"{tail}\n--- qemu stderr ---\n{self.stderr.strip()}"

    def check(self) -> GuestRun:
        """Raise :class:`GuestError` unless :attr:`ok`; return self for chaining."""
        if not self.ok:
            raise GuestError(
                f"guest run failed (client rc={self.client_rc}, qemu rc={self.returncode}, "
                f"timed out={self.timed_out}, errors={self.errors})\n{self.console_tail()}"
            )
        return self


def kernel_append(
    steps: str | None = None,
    *,
    apdus: Iterable[str] | None = None,
    pcscd_log: int = 0,
    guest_timeout: float = 40.0,
    params: Mapping[str, str | int] | None = None,
) -> str:
    """The kernel command line for one run.

    Pitfall: every ``name=value`` word must be free of spaces and of dots in
    the name (dotted names are module parameters and never reach /init), and
    the whole line must fit in 2047 bytes or the kernel truncates it.
    """
    words = list(BASE_APPEND)
    values: dict[str, str] = {"guest_timeout": str(max(1, int(guest_timeout)))}
    if pcscd_log:
        values["pcscd_log"] = str(pcscd_log)
    if steps:
        values["steps"] = steps
    if apdus is not None:
        values["apdus"] = ",".join(apdus)
    values.update({k: str(v) for k, v in (params or {}).items()})
    for name, value in values.items():
        if not value or any(c.isspace() or c == '"' for c in value) or "." in name:
            raise ValueError(f"kernel argument {name}={value!r} must be non-empty, no spaces")
        words.append(f"{name}={value}")
    line = " ".join(words)
    if len(line) > COMMAND_LINE_MAX:
        raise CommandLineTooLong(f"kernel command line too long ({len(line)} > {COMMAND_LINE_MAX})")
    return line


def overlay_initrd(image: GuestImage, env: Mapping[str, str], directory: Path) -> Path:
    """A copy of the image's initrd with ``/ccidt/env/<name>`` files appended.

    For values too long for the kernel command line (long step scripts, big
    APDUs): /init exports every such file as an environment variable.  The
    kernel unpacks concatenated archives, compressed or not; the appended
    uncompressed cpio must start on a 4-byte boundary, hence the zero padding.
    """
    cpio = CpioWriter()
    for name, value in env.items():
        cpio.file(f"ccidt/env/{name}", value.encode())
    base = image.initrd.read_bytes()
    path = directory / "initrd-overlay.gz"
    path.write_bytes(base + b"\0" * (-len(base) % 4) + cpio.getvalue())
    return path


def qemu_argv(image: GuestImage, device_args: Sequence[str], append: str,
              qemu: str = QEMU, initrd: Path | None = None) -> list[str]:
    """The full QEMU command line.

    Pitfalls: ``-cpu max`` gives the TCG guest RDRAND (otherwise pcscd blocks
    about 1 s in getrandom); q35 + qemu-xhci needs only the xhci modules
    (``-machine pc``'s UHCI would need uhci-hcd too); ``-smp 1`` is faster than
    2 on a 2-core host; ``-no-reboot`` turns the guest's panic=-1 into an exit.
    The ``qemu-xhci`` controller ``usb`` is added unless ``device_args`` bring
    one (the guest has xhci drivers only: other controllers see no reader).
    """
    return [
        qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.vmlinux), "-initrd", str(initrd or image.initrd), "-append", append,
        *([] if has_usb_controller(device_args) else ["-device", "qemu-xhci,id=usb"]),
        *device_args,
    ]


Predicate = Callable[[Record], bool]


class GuestHandle:
    """A running guest.  Use as a context manager (leaving it kills QEMU)."""

    def __init__(self, argv: list[str], timeout: float, env: Mapping[str, str] | None = None,
                 scratch: tempfile.TemporaryDirectory[str] | None = None):
        self.argv = argv
        self._scratch = scratch
        self.lines: list[str] = []
        self.records: list[Record] = []
        self._stderr: list[str] = []
        self._cursor = 0
        self._cond = threading.Condition()
        self._eof = False
        self._timed_out = False
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **env} if env is not None else None,
        )
        self.pid = self.proc.pid
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name=f"qemu-{self.pid}-out"),
            threading.Thread(target=self._read_stderr, daemon=True, name=f"qemu-{self.pid}-err"),
        ]
        for thread in self._threads:
            thread.start()
        # The host-side guarantee: QEMU dies at the deadline whatever the caller does.
        self._watchdog = threading.Timer(timeout, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    # -- reading -------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                record = parse_line(line, time.monotonic() - self.started, len(self.records))
                if record is not None:
                    self.records.append(record)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.decode("utf-8", "replace"))

    def _expire(self) -> None:
        if self.proc.poll() is None:
            self._timed_out = True
            self.kill()

    # -- waiting -------------------------------------------------------------------------

    def wait_for(self, what: str | Predicate, timeout: float = 20.0) -> Record:
        """Wait for the next record (after the previous match) that matches.

        ``what`` is either a prefix of the line after ``"CCIDT "`` (e.g.
        ``"mark ready"``, ``"state empty"``, ``"step n=3"``) or a predicate on
        :class:`Record`.  Raises :class:`GuestTimeout` after ``timeout``
        seconds and :class:`GuestError` if QEMU exits first.
        """
        matches = _matcher(what)
        end = min(time.monotonic() + timeout, self.deadline + 1.0)
        with self._cond:
            while True:
                while self._cursor < len(self.records):
                    record = self.records[self._cursor]
                    self._cursor += 1
                    if matches(record):
                        return record
                if self._eof:
                    raise GuestError(f"guest ended before {what!r}\n{self._tail()}")
                left = end - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"no {what!r} within {timeout} s\n{self._tail()}")
                self._cond.wait(left)

    def _tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:]) + "\n--- qemu stderr ---\n" + "".join(self._stderr)

    # -- ending --------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL QEMU by its PID (idempotent) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self._scratch is not None and self.proc.returncode is not None:
            self._scratch.cleanup()

    def result(self, timeout: float | None = None) -> GuestRun:
        """Wait for QEMU to exit (at most until the run's deadline) and parse the run."""
        end = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        try:
            self.proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._timed_out = True
            self.kill()
        self._watchdog.cancel()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._scratch is not None:
            self._scratch.cleanup()
        with self._cond:
            return GuestRun(
                lines=list(self.lines),
                records=list(self.records),
                returncode=self.proc.returncode,
                timed_out=self._timed_out,
                wall_seconds=time.monotonic() - self.started,
                stderr="".join(self._stderr),
                argv=list(self.argv),
            )

    def __enter__(self) -> GuestHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._watchdog.cancel()
        self.kill()


def _matcher(what: str | Predicate) -> Predicate:
    if callable(what):
        return what
    return lambda record: f"{record.kind} {record.text}".startswith(what)


def start_guest(
    image: GuestImage,
    device_args: Sequence[str],
    steps: str | None = None,
    timeout: float = 45.0,
    *,
    apdus: Iterable[str] | None = None,
    pcscd_log: int = 0,
    params: Mapping[str, str | int] | None = None,
    qemu: str = QEMU,
    env: Mapping[str, str] | None = None,
) -> GuestHandle:
    """Start QEMU with the guest and return at once.

    ``device_args`` are the reader's QEMU arguments (``-device usb-ccid,...,bus=usb.0``,
    ``-chardev ...``, ``-device ccid-card-passthru,...``); the xhci controller
    ``usb`` is always added.  The guest powers off ``2 s`` before ``timeout``;
    QEMU is killed at ``timeout``.  ``params`` adds kernel-command-line words
    (``mode``, ``monitor_ms``, ``repeat``, ``reader``, ``usb_wait``,
    ``guest_timeout``); ``env`` adds to QEMU's environment (e.g.
    ``QEMU_CCID_PASSTHRU_DEBUG``).
    """
    guest_timeout = max(1.0, timeout - 2.0)
    apdus = list(apdus) if apdus is not None else None
    try:
        append = kernel_append(steps, apdus=apdus, pcscd_log=pcscd_log,
                               guest_timeout=guest_timeout, params=params)
        initrd, scratch = None, None
    except CommandLineTooLong:
        # Too long for the command line: steps/apdus travel in an initrd overlay.
        long_values = {"steps": steps, "apdus": ",".join(apdus) if apdus is not None else None}
        append = kernel_append(None, pcscd_log=pcscd_log, guest_timeout=guest_timeout,
                               params=params)
        scratch = tempfile.TemporaryDirectory(prefix="ccidt-guest-")
        initrd = overlay_initrd(image, {k: v for k, v in long_values.items() if v},
                                Path(scratch.name))
    try:
        return GuestHandle(qemu_argv(image, device_args, append, qemu, initrd), timeout, env,
                           scratch)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise


def boot_guest(
    image: GuestImage,
    device_args: Sequence[str],
    steps: str | None = None,
    timeout: float = 45.0,
    **kwargs: object,
) -> GuestRun:
    """Boot the guest, run ``steps`` (or ``apdus=[...]``) and return the parsed run.

    Takes the keyword arguments of :func:`start_guest`.  Does not raise on
    failure: call ``.check()`` on the result for that.
    """
    with start_guest(image, device_args, steps, timeout, **kwargs) as handle:  # type: ignore[arg-type]
        return handle.result()


def has_usb_controller(device_args: Sequence[str]) -> bool:
    """Whether ``device_args`` already add the ``usb`` controller (``qemu-argv --usb``)."""
    for flag, value in zip(device_args, device_args[1:], strict=False):
        if flag != "-device":
            continue
        if value.startswith("{"):
            try:
                if json.loads(value).get("id") == "usb":
                    return True
            except ValueError:
                continue
        elif "id=usb" in value.split(","):
            return True
    return False
