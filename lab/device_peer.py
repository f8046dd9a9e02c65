"""QEMU's side of the chardev over a real socket, driven by the QEMU 7.2 twin.

:class:`DevicePeer` puts :class:`~lab.twin.QemuDevice` on a
TCP or Unix socket, listening (as QEMU with ``server=on,wait=off``) or
connecting (as QEMU with ``reconnect=``), and plays the guest: ``guest(apdu)``
is an XfrBlock and returns what the guest got.  Tests use it to check the
bridge's answers APDU by APDU; the benchmarks use it as the peer whose round
trip they time.  One thread does all socket IO.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

from ccidbridge.spec import Endpoint
from lab.twin import GuestAnswer, QemuDevice


class PeerTimeout(AssertionError):
    pass


class DevicePeer:
    def __init__(
        self,
        kind: str = "tcp",
        *,
        listen: bool = True,
        path: str | None = None,
        port: int = 0,
        wait_on: bool = False,
    ) -> None:
        self.kind = kind
        self.listen = listen
        self.device = QemuDevice(wait_on=wait_on)
        self._cond = threading.Condition()
        self._wlock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._conn: socket.socket | None = None
        self._server: socket.socket | None = None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self.connections = 0
        if kind == "unix":
            assert path
            self.path = path
            self.port = 0
        else:
            self.path = None
            self.port = port
        if listen:
            if kind == "unix":
                self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._server.bind(self.path)
            else:
                self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._server.bind(("127.0.0.1", port))
                self.port = self._server.getsockname()[1]
            self._server.listen(4)
            self._sel.register(self._server, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="device-peer", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> Endpoint:
        """Where the bridge must go: it connects when we listen, and vice versa."""
        if self.kind == "unix":
            return Endpoint("unix", bridge_listens=not self.listen, path=self.path)
        return Endpoint("tcp", bridge_listens=not self.listen, host="127.0.0.1", port=self.port)

    # -- IO thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            if not self.listen and self._conn is None:
                self._try_connect()
            for key, _ in self._sel.select(timeout=0.05):
                if key.data == "accept":
                    conn, _ = self._server.accept()
                    if self._conn is not None:
                        conn.close()
                        continue
                    self._attach(conn)
                elif key.data == "wake":
                    os.read(self._wake_r, 4096)
                else:
                    self._read()
            self._write()

    def _try_connect(self) -> None:
        family = socket.AF_UNIX if self.kind == "unix" else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect(self.path if self.kind == "unix" else ("127.0.0.1", self.port))
        except OSError:
            s.close()
            time.sleep(0.02)
            return
        self._attach(s)

    def _attach(self, conn: socket.socket) -> None:
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            self._conn = conn
            self.connections += 1
            self.device.connect()
            self._cond.notify_all()
        self._sel.register(conn, selectors.EVENT_READ, "conn")

    def _read(self) -> None:
        assert self._conn is not None
        try:
            data = self._conn.recv(65536)
        except OSError:
            data = b""
        with self._cond:
            if data:
                self.device.receive_data(data)
            else:
                self._drop()
            self._cond.notify_all()

    def _drop(self) -> None:
        if self._conn is not None:
            self._sel.unregister(self._conn)
            self._conn.close()
            self._conn = None
            self.device.disconnect()

    def _write(self) -> None:
        # Both the IO thread and guest() write: one at a time, in the order
        # the device produced the bytes, so frames never interleave.
        with self._wlock:
            with self._cond:
                out = self.device.data_to_send()
                conn = self._conn
            if out and conn is not None:
                try:
                    conn.sendall(out)
                except OSError:
                    with self._cond:
                        self._drop()

    def _wake(self) -> None:
        os.write(self._wake_w, b"x")

    # -- the test's side ---------------------------------------------------------------

    def wait(self, predicate, timeout: float = 5.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.device):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout(f"timed out waiting for {what}")
                self._cond.wait(left)

    def wait_card(self, present: bool = True, timeout: float = 5.0) -> None:
        self.wait(lambda d: d.card_present is present, timeout, f"card_present={present}")

    def guest(self, apdu: bytes, timeout: float = 5.0) -> GuestAnswer:
        """One guest XfrBlock; returns what the guest got."""
        with self._cond:
            seq = self.device.guest_transmit(apdu)
        self._write()
        result: list[GuestAnswer] = []

        def answered(d: QemuDevice) -> bool:
            a = d.answers[-1] if d.answers and d.answers[-1].seq == seq else d.answer_for(seq)
            if a is not None:
                result.append(a)
            return a is not None

        self.wait(answered, timeout, f"an answer to guest request {seq}")
        return result[0]

    def disconnect(self) -> None:
        """Drop the current connection (as if QEMU's peer vanished)."""
        with self._cond:
            self._drop()
        self._wake()

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(2)
        with self._cond:
            self._drop()
        if self._server is not None:
            self._server.close()
            if self.kind == "unix" and self.path and os.path.exists(self.path):
                os.unlink(self.path)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> DevicePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
