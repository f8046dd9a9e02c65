"""Shared pieces: statistics, the timing peer, child processes, machine facts.

Every figure the benchmarks report is a distribution (median, p99) or a
ratio of distributions measured in the same run, interleaved, because the
machines are shared and noisy: absolute microseconds are printed for
orientation only.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ccidbridge.spec import Endpoint
from lab.twin import QemuDevice

ROOT = Path(__file__).resolve().parent.parent
_HDR = struct.Struct(">III")
APDU_TYPE = 7
#: GET CHALLENGE for 8 bytes: what the direct-pyscard baselines use; every
#: card here answers it with 8 bytes + 90 00.
GET_CHALLENGE = bytes.fromhex("0084000008")


def apdu_frame(apdu: bytes) -> bytes:
    return _HDR.pack(APDU_TYPE, 0, len(apdu)) + apdu


# -- statistics ------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (q in 0..1) of ``values``."""
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def summary(values_ns: list[int] | list[float]) -> dict[str, float]:
    """Median, p99 (and n, min, p90) of a list of nanosecond samples, in µs."""
    us = [v / 1000 for v in values_ns]
    return {
        "n": len(us),
        "min_us": min(us) if us else float("nan"),
        "median_us": quantile(us, 0.5),
        "p90_us": quantile(us, 0.9),
        "p99_us": quantile(us, 0.99),
    }


def ratio(a: dict[str, float], b: dict[str, float], key: str = "median_us") -> float:
    return a[key] / b[key]


# -- processes ---------------------------------------------------------------------------


@dataclass
class Child:
    """A child process we started; stopped by PID (SIGTERM, then SIGKILL)."""

    proc: subprocess.Popen[bytes]
    name: str
    lines: list[tuple[float, str]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident set size from /proc/PID/status (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.pid}")

    def wait_line(self, needle: str, after: float = 0.0, timeout: float = 10.0) -> float:
        """perf_counter() at which a stderr line containing ``needle`` arrived after ``after``."""
        deadline = time.perf_counter() + timeout
        seen = 0
        while time.perf_counter() < deadline:
            lines = self.lines
            for t, line in lines[seen:]:
                if t >= after and needle in line:
                    return t
            seen = len(lines)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc {self.proc.returncode}: {self.tail()}")
            time.sleep(0.001)
        raise TimeoutError(f"{self.name}: no line with {needle!r}; log:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def stop(self, timeout: float = 5.0) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdin is not None:
            proc.stdin.close()
        if self._reader is not None:
            self._reader.join(2)


@dataclass(frozen=True)
class Counters:
    """What a process has cost so far: context switches (all its threads) and CPU time."""

    voluntary: int
    involuntary: int
    cpu_ns: int

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.voluntary - other.voluntary,
            self.involuntary - other.involuntary,
            self.cpu_ns - other.cpu_ns,
        )

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.voluntary + other.voluntary,
            self.involuntary + other.involuntary,
            self.cpu_ns + other.cpu_ns,
        )


ZERO = Counters(0, 0, 0)


def counters(pid: int) -> Counters:
    """Context switches and CPU time (``schedstat``'s run time, in ns) summed
    over every thread of ``pid``: ``/proc/PID/status`` counts one thread only.

    A wake-up is a voluntary switch (the thread blocked and was woken) or an
    involuntary one (it was preempted); both cost a trip through the scheduler.
    """
    vol = invol = cpu = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
            cpu += int((task / "schedstat").read_text().split()[0])
    return Counters(vol, invol, cpu)


def spawn(
    name: str, args: list[str], capture: bool = False, program: str = sys.executable
) -> Child:
    """``python -m benchmarks.servers ARGS`` (or any module, or ``program``) as a child.

    With ``capture`` its stderr lines are collected with their arrival time
    (``time.perf_counter()``, the clock every measurement here uses).  Its
    stdin is a pipe nobody writes to (vscclient watches stdin for commands;
    /dev/null would be readable, at EOF, all the time).
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [program, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    child = Child(proc, name)
    if capture:
        assert proc.stderr is not None

        def pump() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                child.lines.append((time.perf_counter(), raw.decode(errors="replace").rstrip()))

        child._reader = threading.Thread(target=pump, name=f"{name}-stderr", daemon=True)
        child._reader.start()
    return child


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to put children in; every one is stopped (by PID) on the way out."""
    kids: list[Child] = []
    try:
        yield kids
    finally:
        for kid in reversed(kids):
            kid.stop()


# -- the timing peer -------------------------------------------------------------------


class Peer:
    """QEMU's end of the chardev, lean enough to time round trips with.

    It listens (as QEMU with ``server=on,wait=off``) on a Unix socket or a
    loopback TCP port; whatever connects is the thing under test.  The
    handshake (Init, ReaderAdd, ATR and their acks) is played by the QEMU 7.2
    twin (:class:`~lab.twin.QemuDevice`); after it, one
    :meth:`roundtrip` is a prebuilt VSC_APDU frame written with one
    ``sendall`` and the answer frame read back with blocking ``recv`` — the
    same cost for every variant, so ratios compare the things behind the socket.
    """

    def __init__(self, kind: str, workdir: str, name: str = "peer") -> None:
        self.kind = kind
        if kind == "unix":
            self.path = os.path.join(workdir, f"{name}.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(self.path)
            self.port = 0
        else:
            self.path = ""
            self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.server.bind(("127.0.0.1", 0))
            self.port = self.server.getsockname()[1]
        self.server.listen(4)
        self.sock: socket.socket | None = None
        self.device = QemuDevice()
        self._buf = b""

    @property
    def arg(self) -> str:
        """The ``--endpoint`` argument for :mod:`benchmarks.servers`."""
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        if self.kind == "unix":
            return Endpoint("unix", bridge_listens=False, path=self.path)
        return Endpoint("tcp", bridge_listens=False, host="127.0.0.1", port=self.port)

    def accept(self, timeout: float = 10.0) -> None:
        self.server.settimeout(timeout)
        sock, _ = self.server.accept()
        sock.settimeout(None)
        if self.kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.device = QemuDevice()
        self.device.connect()
        self._buf = b""

    def handshake(self, timeout: float = 10.0) -> None:
        """Play QEMU until the bridge's ATR is acked (the card is present)."""
        self.pump_until(lambda d: d.card_present, timeout)

    def pump_until(self, done: Callable[[QemuDevice], bool], timeout: float = 10.0) -> float:
        """Feed the twin until ``done(device)``; return perf_counter() of the deciding read."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        dev = self.device
        t = time.perf_counter()
        while not done(dev):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("peer: the bridge did not get there in time")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            t = time.perf_counter()
            if not data:
                raise ConnectionError("peer: the bridge closed the connection")
            dev.receive_data(data)
            out = dev.data_to_send()
            if out:
                self.sock.sendall(out)
        self.sock.settimeout(None)
        return t

    def roundtrip(self, frame: bytes) -> int:
        """One APDU frame out, one answer frame back; nanoseconds."""
        sock = self.sock
        assert sock is not None
        recv = sock.recv
        t0 = time.perf_counter_ns()
        sock.sendall(frame)
        buf = recv(65536)
        while len(buf) < 12 or len(buf) < 12 + _HDR.unpack_from(buf)[2]:
            more = recv(65536)
            if not more:
                raise ConnectionError("peer: connection closed mid-answer")
            buf += more
        t1 = time.perf_counter_ns()
        self._last = buf
        if buf[3] != APDU_TYPE:  # VSC_Error or a stray control frame: not an answer
            raise RuntimeError(f"peer: answer frame of type {buf[3]}: {buf.hex()}")
        return t1 - t0

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Keep playing QEMU until the other end has been silent for ``quiet``
        seconds (vscclient adds every PC/SC reader it sees, one by one, after
        the first ATR: those frames must not be taken for answers)."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        dev = self.device
        while time.monotonic() < deadline:
            self.sock.settimeout(quiet)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                raise ConnectionError("peer: the other end closed the connection")
            dev.receive_data(data)
            out = dev.data_to_send()
            if out:
                self.sock.sendall(out)
        self.sock.settimeout(None)

    def last_answer(self) -> bytes:
        return self._last[12:]

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self.server.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@contextlib.contextmanager
def one_card_bridge() -> Iterator[tuple[Peer, Child]]:
    """A bridge process serving one vpcd test card over a Unix socket, and its
    peer, through the handshake: what the memory items measure."""
    from lab.pcsc import PcscStack

    with PcscStack(1, debug=False) as stack, workdir() as tmp, children() as kids:
        card = stack.insert_card(process=True)
        peer = Peer("unix", tmp)
        try:
            bridge = spawn(
                "bridge",
                ["-m", "benchmarks.servers", "bridge", "--endpoint", peer.arg,
                 "--reader", card.reader],
            )  # fmt: skip
            kids.append(bridge)
            peer.accept()
            peer.handshake()
            yield peer, bridge
        finally:
            peer.close()
            with contextlib.suppress(Exception):
                card.close()


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[str]:
    """Run this process (and every process and thread it starts meanwhile:
    pcscd, cards, bridges, servers) on one CPU, or leave scheduling free.

    Why: on a small VM, a round trip between two processes is bimodal —
    about 10 µs when the scheduler keeps them on one CPU, 45-60 µs when the
    wake-up crosses CPUs — and which mode a block of samples lands in is luck,
    so free-running medians swing by 4x between runs.  Pinned, the figures
    measure work and context switches, and ratios are stable; free, they
    show what the scheduler makes of it.  Yields the mode's label.
    """
    if cpu is None:
        yield "free"
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield f"cpu{cpu}"
    finally:
        os.sched_setaffinity(0, before)


def workdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="ccidbridge-bench-")


# -- the machine -------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _dpkg_version(package: str) -> str:
    return _first_line(["dpkg-query", "-W", "-f=${Version}", package])


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    import smartcard

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "pyscard": getattr(smartcard, "__version__", None) or _pip_version("pyscard"),
        "pcscd": _dpkg_version("pcscd"),
        "vsmartcard-vpcd": _dpkg_version("vsmartcard-vpcd"),
        "qemu": _dpkg_version("qemu-system-x86"),
        "loadavg": os.getloadavg(),
    }


def _pip_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"
