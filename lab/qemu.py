"""Run qemu-system-x86_64 for tests: output to files, a QMP socket, kill by pid.

The "QEMU alone" passthru setup (docs/lab.md#V11, protocol/VSCARD.md#Q5)
needs no guest OS: QEMU answers every VSCard control message itself, which is
enough for handshake tests.  Facts that shape this module:

* No KVM here: ``-accel tcg``.  ``-nodefaults -display none -serial none``
  keep it small; ``-m 64`` is plenty without a guest.
* ``ccid-card-passthru`` goes on a socket chardev.  With ``server=on,wait=off``
  (QEMU listens) or ``reconnect=1`` (QEMU connects) QEMU sends **nothing** on
  connect; with ``wait=on`` it would block start-up until a client arrives.
* Debug output (``QEMU_CCID_PASSTHRU_DEBUG=4``) goes to stdout, error_report
  ("wrong magic", ATR errors) to stderr — both are captured to files.
* :meth:`Qemu.wait_listening` reads ``/proc/net/{tcp,tcp6,unix}`` rather than
  connecting: a probe connection would be a real VSCard peer to QEMU.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccidbridge.config.versions import QemuVersion
from lab.process import reap
from lab.stacks import HOST, Stack

QEMU = "qemu-system-x86_64"


class QemuError(RuntimeError):
    """QEMU did not start, exited, or a QMP command failed."""


@dataclass(frozen=True)
class TcpEndpoint:
    """``host:port`` for a socket chardev."""

    port: int
    host: str = "127.0.0.1"

    def chardev_opts(self) -> str:
        return f"host={self.host},port={self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def listen(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(1)
        return s


@dataclass(frozen=True)
class UnixEndpoint:
    """A unix socket path for a socket chardev."""

    path: str

    def chardev_opts(self) -> str:
        return f"path={self.path}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        return s

    def listen(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(1)
        return s


Endpoint = TcpEndpoint | UnixEndpoint


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out (racy in theory, fine in a private netns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_listening(port: int) -> bool:
    """Is anything in this netns LISTENing on TCP ``port`` (any address)?"""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def unix_listening(path: str) -> bool:
    """Is a unix stream socket bound to ``path`` in listening state (__SO_ACCEPTCON)?"""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


def passthru_args(
    endpoints: list[Endpoint] | Endpoint,
    *,
    server: bool = True,
    memory_mb: int = 64,
    tls_dir: str | None = None,
    reconnect_ms: bool = False,
) -> list[str]:
    """Argv (without the binary) for QEMU alone with one passthru card per endpoint.

    One ``usb-ccid`` + ``ccid-card-passthru`` + chardev set per endpoint, since
    usb-ccid has a single slot (protocol/VSCARD.md#Q16).  ``server=True``:
    QEMU listens (``server=on,wait=off``); ``False``: QEMU connects
    (``reconnect=1``) to a listener the caller provides.  Device ids are
    ``ccid{i}`` / ``pt{i}``, chardev ids ``cc{i}``.  ``tls_dir``: TLS on every
    chardev with QEMU's ``tls-creds-x509`` from that directory (``verify-peer=on``).
    """
    if not isinstance(endpoints, list):
        endpoints = [endpoints]
    args = ["-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-serial", "none", "-m", str(memory_mb), "-usb"]  # fmt: skip
    for i, ep in enumerate(endpoints):
        client = "server=off,reconnect-ms=1000" if reconnect_ms else "server=off,reconnect=1"
        mode = "server=on,wait=off" if server else client
        if tls_dir is not None:
            role = "server" if server else "client"
            args += ["-object", f"tls-creds-x509,id=tls{i},dir={tls_dir},endpoint={role},"
                     "verify-peer=on"]
            mode += f",tls-creds=tls{i}"
        args += [
            "-chardev", f"socket,id=cc{i},{ep.chardev_opts()},{mode}",
            "-device", f"usb-ccid,id=ccid{i}",
            "-device", f"ccid-card-passthru,chardev=cc{i},id=pt{i}",
        ]  # fmt: skip
    return args


class Qemu:
    """One qemu-system-x86_64 process with a QMP unix socket.

    ``start()`` execs QEMU with ``args`` plus ``-qmp``, connects to QMP and
    does the ``qmp_capabilities`` handshake.  stdout/stderr go to
    ``stdout_path``/``stderr_path`` in ``workdir``.  ``kill()`` stops it by pid.
    ``stack`` picks whose QEMU runs (lab.stacks: this machine's, or chrooted in a
    Debian 13 / sid root); the workdir must then be under /tmp (bound into the root).
    """

    def __init__(
        self,
        args: list[str],
        *,
        workdir: Path | str | None = None,
        env: dict[str, str] | None = None,
        binary: str = QEMU,
        start_timeout: float = 10.0,
        stack: Stack = HOST,
    ) -> None:
        self.args = list(args)
        self.stack = stack
        self._own_tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="ccidbridge-qemu-")
            workdir = self._own_tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = str(self.workdir / "qmp.sock")
        self.stdout_path = self.workdir / "qemu.stdout"
        self.stderr_path = self.workdir / "qemu.stderr"
        self.env = env
        self.binary = binary
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: socket.socket | None = None
        self._qmp_file: Any = None
        self._ids = itertools.count(1)
        #: QMP events seen while waiting for command replies
        self.events: list[dict[str, Any]] = []
        #: seconds from exec to QMP ready, for the last start
        self.start_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def argv(self) -> list[str]:
        return self.stack.command(
            [self.binary, *self.args, "-qmp", f"unix:{self.qmp_path},server=on,wait=off"])

    def start(self) -> Qemu:
        if self.stack.is_host and shutil.which(self.binary) is None:
            raise QemuError(f"{self.binary} not found")
        self.stack.enter()
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        t0 = time.monotonic()
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )
        try:
            self._qmp_connect(t0 + self.start_timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise QemuError(
                f"QEMU exited with rc {self.proc.returncode}; stderr:\n{self.stderr()[-2000:]}"
            )

    def _qmp_connect(self, deadline: float) -> None:
        while True:
            self._check_alive()
            if unix_listening(self.qmp_path):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    s.connect(self.qmp_path)
                    break
                except OSError:
                    s.close()
            if time.monotonic() > deadline:
                raise QemuError(f"QMP socket not up; stderr:\n{self.stderr()[-2000:]}")
            time.sleep(0.01)
        self._qmp = s
        self._qmp_file = s.makefile("rb")
        greeting = self._read_msg()
        if "QMP" not in greeting:
            raise QemuError(f"unexpected QMP greeting {greeting!r}")
        self.qmp("qmp_capabilities")

    def _read_msg(self) -> dict[str, Any]:
        line = self._qmp_file.readline()
        if not line:
            raise QemuError("QMP connection closed")
        return json.loads(line)

    def qmp(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        """Run a QMP command and return its ``return`` value (raise on ``error``)."""
        if self._qmp is None:
            raise QemuError("QMP not connected")
        self._qmp.settimeout(timeout)
        cid = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        self._qmp.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            try:
                reply = self._read_msg()
            except TimeoutError as exc:
                raise QemuError(f"QMP {command} timed out after {timeout} s") from exc
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != cid:
                continue
            if "error" in reply:
                raise QemuError(f"QMP {command}: {reply['error']}")
            return reply.get("return")

    def hmp(self, command_line: str, timeout: float = 10.0) -> str:
        """A human monitor command (``info usb``, ``info qtree``…) via QMP."""
        return self.qmp("human-monitor-command", timeout=timeout, **{"command-line": command_line})

    def wait_listening(self, endpoint: Endpoint | int | str, timeout: float = 10.0) -> None:
        """Poll until QEMU listens on a TCP port (int/TcpEndpoint) or unix path (str)."""
        if isinstance(endpoint, TcpEndpoint):
            endpoint = endpoint.port
        elif isinstance(endpoint, UnixEndpoint):
            endpoint = endpoint.path
        deadline = time.monotonic() + timeout
        while True:
            ok = tcp_listening(endpoint) if isinstance(endpoint, int) else unix_listening(endpoint)
            if ok:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"QEMU not listening on {endpoint!r} after {timeout} s")
            time.sleep(0.005)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Signal QEMU by pid and reap it.  Idempotent."""
        if self._qmp_file is not None:
            with contextlib.suppress(OSError):
                self._qmp_file.close()
            self._qmp_file = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        proc, self.proc = self.proc, None
        return reap(proc, sig, timeout)

    def quit(self, timeout: float = 10.0) -> int | None:
        """Graceful ``quit`` over QMP, then reap (falls back to SIGKILL)."""
        if self.proc is not None and self._qmp is not None:
            with contextlib.suppress(QemuError, OSError):
                self.qmp("quit", timeout=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        return self.kill()

    def close(self) -> None:
        self.kill()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class QemuPassthru(Qemu):
    """QEMU alone with ``ccid-card-passthru`` on socket chardevs (docs/lab.md#V11).

    ``transport`` "tcp" picks a free port, "unix" a socket in ``workdir``;
    ``n_cards`` sets of usb-ccid + passthru.  With ``server=True`` (default)
    ``start()`` also waits until QEMU listens on every endpoint; with
    ``server=False`` QEMU connects (reconnect=1) to ``endpoints`` the caller
    listens on (pass them in, or use the generated ones and listen first).
    ``debug=True`` sets QEMU_CCID_PASSTHRU_DEBUG/QEMU_CCID_DEBUG=4 (stdout).
    """

    def __init__(
        self,
        transport: str = "tcp",
        *,
        server: bool = True,
        n_cards: int = 1,
        endpoints: list[Endpoint] | None = None,
        debug: bool = False,
        workdir: Path | str | None = None,
        extra_args: list[str] | None = None,
        tls_dir: str | None = None,
        stack: Stack = HOST,
    ) -> None:
        super().__init__([], workdir=workdir, stack=stack)
        if endpoints is None:
            if transport == "tcp":
                endpoints = [TcpEndpoint(free_tcp_port()) for _ in range(n_cards)]
            elif transport == "unix":
                endpoints = [
                    UnixEndpoint(str(self.workdir / f"vscard{i}.sock")) for i in range(n_cards)
                ]
            else:
                raise ValueError(f"transport must be tcp or unix, not {transport!r}")
        self.endpoints: list[Endpoint] = endpoints
        self.server = server
        reconnect_ms = QemuVersion.parse(stack.qemu).has_reconnect_ms
        self.args = passthru_args(
            endpoints, server=server, reconnect_ms=reconnect_ms, tls_dir=tls_dir
        ) + list(extra_args or [])
        if debug:
            self.env = {"QEMU_CCID_PASSTHRU_DEBUG": "4", "QEMU_CCID_DEBUG": "4"}

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[0]

    def start(self) -> QemuPassthru:
        super().start()
        if self.server:
            for ep in self.endpoints:
                self.wait_listening(ep)
        return self

    def connect(self, index: int = 0, timeout: float = 5.0) -> socket.socket:
        """Connect to QEMU's VSCard chardev (server mode) — you are now the bridge."""
        return self.endpoints[index].connect(timeout)


__all__ = [
    "Endpoint",
    "Qemu",
    "QemuError",
    "QemuPassthru",
    "TcpEndpoint",
    "UnixEndpoint",
    "free_tcp_port",
    "passthru_args",
    "tcp_listening",
    "unix_listening",
]
