"""The vpcd transport every test card uses, and the card-as-a-process wrapper.

vpcd protocol (vsmartcard's vpcd driver, as measured with Debian 12's 3.3):
the card is the TCP *client* of vpcd's per-slot port.  Every message is a
2-byte big-endian length plus payload.  One-byte payloads are control
messages (0 off, 1 on, 2 reset, 4 send ATR, answered with the ATR); anything
else is a C-APDU answered with the R-APDU.  EOF means pcscd went away.  vpcd
3.3 writes length and payload with two send() calls, so we set TCP_QUICKACK
after every recv — otherwise Nagle on vpcd's side and our delayed ACK stall
each APDU by 44 ms.

The card logic is any object with ``atr``, ``power_on()``, ``power_off()`` and
``process(c_apdu) -> r_apdu`` (:class:`CardLogic`); it may raise :class:`Hang`
(never answer) or :class:`Crash` (drop the connection mid-APDU).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lab import child_env
from lab.process import reap


class Hang(Exception):
    """Raised by the card logic to mean: never answer this APDU."""


class Crash(Exception):
    """Raised by the card logic to mean: drop the connection mid-APDU."""


class CardLogic(Protocol):
    atr: bytes

    def power_on(self) -> None: ...
    def power_off(self) -> None: ...
    def process(self, raw: bytes) -> bytes: ...


class VpcdClient:
    """A card's vpcd client loop.  ``run()`` blocks; ``start()`` runs it on a daemon thread.

    Connecting retries until ``connect_timeout`` (unlike vicc, which exits rc 0
    when pcscd is not up yet), so start order does not matter here.
    ``delay_ms`` answers every APDU late (a slow card).
    """

    def __init__(
        self,
        port: int,
        logic: CardLogic,
        *,
        host: str = "127.0.0.1",
        connect_timeout: float = 10.0,
        delay_ms: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.logic = logic
        self.connect_timeout = connect_timeout
        self.delay_ms = delay_ms
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: why run() ended: "eof" (pcscd closed), "crash", "stopped", or an error text
        self.exit_reason: str | None = None
        self.connected = threading.Event()

    # -- wire helpers ----------------------------------------------------
    def _recv_exact(self, n: int) -> bytes | None:
        assert self._sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
            # Re-arm after every recv: Linux clears QUICKACK on its own.
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return bytes(buf)

    def _send(self, payload: bytes) -> None:
        assert self._sock is not None
        # One send for length + payload, so no Nagle stall on our side either.
        self._sock.sendall(len(payload).to_bytes(2, "big") + payload)

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                s = socket.create_connection((self.host, self.port), timeout=1.0)
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except OSError:
                if self._stop.is_set() or time.monotonic() > deadline:
                    raise
                self._stop.wait(0.02)

    # -- main loop -------------------------------------------------------
    def run(self) -> str:
        """Serve until EOF, a crash, or ``stop()``; return the exit reason."""
        try:
            self._sock = self._connect()
        except OSError as exc:
            self.exit_reason = f"connect failed: {exc}"
            return self.exit_reason
        self.connected.set()
        try:
            self.exit_reason = self._serve()
        except OSError as exc:
            self.exit_reason = "stopped" if self._stop.is_set() else f"socket error: {exc}"
        finally:
            self._close()
        return self.exit_reason

    def _serve(self) -> str:
        logic = self.logic
        while True:
            head = self._recv_exact(2)
            if head is None:
                return "stopped" if self._stop.is_set() else "eof"
            msg = self._recv_exact(int.from_bytes(head, "big"))
            if msg is None:
                return "eof"
            if len(msg) == 1:
                ctrl = msg[0]
                if ctrl == 0:
                    logic.power_off()
                elif ctrl in (1, 2):
                    logic.power_on()
                elif ctrl == 4:
                    self._send(logic.atr)
                continue
            try:
                resp = logic.process(msg)
            except Hang:
                self._stop.wait()  # until stop(); a SIGSTOPped process hangs the same way
                return "stopped"
            except Crash:
                return "crash"
            if self.delay_ms and self._stop.wait(self.delay_ms / 1000):
                return "stopped"
            self._send(resp)

    def _close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def start(self) -> VpcdClient:
        """Run on a daemon thread (the in-process form)."""
        self._thread = threading.Thread(target=self.run, name=f"vpcd-card:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect (pcscd then reports the card removed) and join the thread."""
        self._stop.set()
        s = self._sock
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"card thread on port {self.port} did not stop")
            self._thread = None


def card_main(
    module: str,
    description: str | None,
    build: Callable[[argparse.Namespace], CardLogic],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """``python -m MODULE --port P [--host H] [--connect-timeout S] ...``: parse the
    command line, ``build`` the card's logic from it, serve it on vpcd."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True, help="vpcd slot port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    client = VpcdClient(args.port, build(args), host=args.host,
                        connect_timeout=args.connect_timeout)  # fmt: skip
    return serve_forever(client, module)


def serve_forever(client: VpcdClient, name: str) -> int:
    """A card process's main loop: run until pcscd goes or SIGTERM; the exit status."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    reason = client.run()
    print(f"{name} port {client.port}: {reason}", file=sys.stderr)
    return 0 if reason in ("eof", "stopped") else 1


@dataclass(frozen=True)
class CardSpec:
    """How to run a card both ways: ``make()`` builds its logic (in-process form),
    ``module`` + ``args`` is ``python -m MODULE --port P ARGS`` (process form)."""

    module: str
    args: list[str] = field(default_factory=list)
    make: Callable[[], CardLogic] | None = None


class ModuleProcess:
    """A card as a separate process (``python -m MODULE --port P ARGS``), so tests
    can SIGSTOP/SIGKILL it.  Output (stdout+stderr) goes to ``log_path`` when given.
    """

    def __init__(
        self,
        module: str,
        port: int,
        extra_args: list[str] | None = None,
        *,
        log_path: Path | str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.module = module
        self.port = port
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else None
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def args(self) -> list[str]:
        return [self.python, "-m", self.module, "--port", str(self.port), *self.extra_args]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> ModuleProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=child_env(),
            )  # fmt: skip
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return self

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def sigstop(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        self.send_signal(signal.SIGCONT)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Send ``sig`` (after SIGCONT, so a stopped process can die) and reap it."""
        proc, self.proc = self.proc, None
        return reap(proc, sig, timeout, cont=True)

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL)
