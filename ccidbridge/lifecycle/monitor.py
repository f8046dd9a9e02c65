"""Talking to a running QEMU's monitor: through libvirt, or a QMP socket.

libvirt 9.0 refuses to hot-plug the devices a card needs (docs/lifecycle.md#H1),
so ``attach`` sends QMP commands itself: through ``virsh qemu-monitor-command``
for a libvirt domain (libvirt then marks the domain tainted, "custom monitor
control commands issued"), or straight to the QMP Unix socket of a QEMU run
by hand (``--qmp PATH``).  Both speak the same QMP JSON; only the carrier
differs, so everything above this module is written against :class:`Monitor`.
"""

from __future__ import annotations

import json
import socket
import subprocess
from typing import Any, Protocol

#: How long one monitor command may take before we give up on it.
COMMAND_TIMEOUT = 30.0


class MonitorError(Exception):
    """A command failed; ``qmp_class`` is QMP's error class (or "" for a carrier error)."""

    def __init__(self, message: str, qmp_class: str = "") -> None:
        super().__init__(message)
        self.qmp_class = qmp_class


class Monitor(Protocol):
    """A QMP monitor: ``execute`` returns the command's ``return`` value."""

    where: str  # for messages: "domain vm1" or "QMP /run/vm.qmp"

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


def _request(command: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    req: dict[str, Any] = {"execute": command}
    if arguments:
        req["arguments"] = arguments
    return req


def _result(reply: dict[str, Any], command: str) -> Any:
    if "error" in reply:
        err = reply["error"]
        raise MonitorError(f"{command}: {err.get('desc', err)}", err.get("class", ""))
    return reply.get("return")


def hmp(monitor: Monitor, line: str) -> str:
    """An HMP command (``info usb``) through QMP's human-monitor-command."""
    return str(monitor.execute("human-monitor-command", {"command-line": line}))


class VirshMonitor:
    """QMP through libvirt: ``virsh -c URI qemu-monitor-command DOMAIN JSON``."""

    def __init__(self, domain: str, uri: str) -> None:
        self.domain = domain
        self.uri = uri
        self.where = f"domain {domain}"

    def virsh(self, *args: str,
              timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise MonitorError("virsh is not installed (Debian: libvirt-clients)") from None
        except subprocess.TimeoutExpired:
            raise MonitorError(f"virsh {args[0]} did not answer in {timeout:g} s") from None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        proc = self.virsh("qemu-monitor-command", self.domain,
                          json.dumps(_request(command, arguments)))
        if proc.returncode != 0:
            text = virsh_error(proc.stderr)
            # virsh reports QMP errors as "internal error: unable to execute QEMU
            # command 'X': DESC" (the class is lost on the way).
            raise MonitorError(f"{command}: {text}", "virsh")
        return _result(json.loads(proc.stdout), command)


def virsh_error(stderr: str) -> str:
    """virsh's message without the ``error:`` prefixes, on one line."""
    lines = [ln.removeprefix("error: ").strip() for ln in stderr.splitlines() if ln.strip()]
    return "; ".join(lines) or "virsh failed"


class QmpSocket:
    """QMP over its Unix socket (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, path: str, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.where = f"QMP {path}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise MonitorError(f"{path} is not a QMP socket (no greeting)")
            self.execute("qmp_capabilities")
        except OSError as exc:
            self._sock.close()
            raise MonitorError(f"cannot use QMP socket {path}: {exc.strerror or exc}") from None
        except MonitorError:
            self._sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise MonitorError(f"QEMU closed {self.path}")
            self._buf += chunk
            if len(self._buf) > 16 << 20:
                raise MonitorError(f"{self.path}: a QMP line over 16 MiB")
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            self._sock.sendall(json.dumps(_request(command, arguments)).encode() + b"\n")
            while True:
                reply = self._read()
                if "event" not in reply:  # events (DEVICE_DELETED ...) are polled for instead
                    return _result(reply, command)
        except OSError as exc:
            raise MonitorError(f"{command} on {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self._sock.close()
