"""The socket side: meet QEMU's chardev over TCP or a Unix socket.

libvirt's ``<source mode='bind'>`` makes QEMU listen, so the bridge connects
(and reconnects, with a backoff capped at RETRY_MAX, for as long as it runs);
``mode='connect'`` makes QEMU connect (``reconnect=``), so the bridge
listens.  One peer per card at a time: the bridge refuses a second one.

Everything here is plain non-blocking sockets for the bridge's APDU thread to
poll (runtime/bridge.py): no event loop, no thread of its own.

Security by default: a listening Unix socket is created 0600 (bound in a
private 0700 directory, then renamed into place, so there is no window where
it is open to others); a listening TCP socket on an address that is not
loopback is allowed only because the config says so, and the log warns that
the card is then reachable from the network.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import stat
import tempfile

from ccidbridge.spec import Endpoint

#: Reconnect backoff: first retry after this, doubling up to RETRY_MAX.  The
#: cap bounds how long a restarted QEMU waits for us (docs/benchmarks.md#B3,
#: recovery: QEMU listening to ATR acked within 1 s, and the ATR itself waits
#: qemu.REINSERT_PAUSE after the resync).  A refused connect on loopback costs
#: microseconds.
RETRY_MIN = 0.05
RETRY_MAX = 0.25
#: One read takes at most this much; with the out-buffer limit below it bounds
#: what a peer that stops reading can make the bridge hold (docs/benchmarks.md#B2).
READ_SIZE = 4096

class TransportError(Exception):
    """The endpoint cannot be used at all (bad path, address in use, ...)."""


class Connection:
    """One connected socket to QEMU's chardev, non-blocking."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, peer: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.tls = isinstance(sock, ssl.SSLSocket)
        if self.tcp:
            # Small frames, each awaited by the other side: no Nagle stalls.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._quickack = self.tcp and hasattr(socket, "TCP_QUICKACK")

    def recv(self) -> bytes:
        """What arrived (b"" at EOF); raises BlockingIOError when nothing did."""
        if self.tls:
            return self._recv_tls()
        data = self.sock.recv(READ_SIZE)
        if self._quickack:
            # QEMU's socket chardev has Nagle on and writes a frame's header and
            # payload with two writes, so the payload waits for our ACK of the
            # header, which delayed ACK holds back ~40 ms (protocol/VSCARD.md#Q17).
            # Linux drops QUICKACK by itself: re-arm it after every read.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def _recv_tls(self) -> bytes:
        """A TLS record may hold more than one read's worth: take what the TLS layer
        already decrypted too, since poll() cannot see it."""
        sock = self.sock
        try:
            data = sock.recv(READ_SIZE)
            while data and sock.pending():  # type: ignore[attr-defined]
                data += sock.recv(sock.pending())  # type: ignore[attr-defined]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError() from None
        except ssl.SSLZeroReturnError:
            return b""
        if self._quickack:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes written (0 when the socket buffer is full)."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def peer_name(endpoint: Endpoint, address: object) -> str:
    if endpoint.kind == "unix":
        return endpoint.path or "unix socket"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def start_connect(endpoint: Endpoint) -> tuple[socket.socket, bool]:
    """A non-blocking connect to QEMU's listening chardev: (socket, done).

    ``done`` False: the connect is in progress; poll for POLLOUT, then
    :func:`finish_connect`.  Raises OSError when it failed at once.
    """
    if endpoint.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = endpoint.path
    else:
        infos = socket.getaddrinfo(
            endpoint.host or "localhost", endpoint.port, type=socket.SOCK_STREAM
        )
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex(address)  # type: ignore[arg-type]
    if err == 0:
        return sock, True
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        return sock, False
    sock.close()
    raise OSError(err, os.strerror(err))


def finish_connect(sock: socket.socket) -> None:
    """After POLLOUT on an in-progress connect: raise OSError if it failed."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        raise OSError(err, os.strerror(err))


class TlsHandshake:
    """A TLS handshake under way on a new connection, driven by the APDU thread's poll.

    :meth:`step` returns the poll events it waits for, 0 when done; it raises
    ssl.SSLError/OSError when the handshake failed (the caller drops the peer).
    """

    def __init__(self, sock: ssl.SSLSocket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.deadline = deadline

    def step(self) -> int:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return select.POLLIN
        except ssl.SSLWantWriteError:
            return select.POLLOUT
        return 0


def tls_failure(exc: BaseException) -> str:
    """One line on why a TLS peer was refused."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return f"the TLS handshake failed: {str(reason).replace('_', ' ').lower()}"
    if isinstance(exc, OSError):
        return f"the connection failed during the TLS handshake: {exc.strerror or exc}"
    return str(exc)


class Listener:
    """The bridge's listening socket, for QEMU's connecting chardev."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        if endpoint.kind == "unix":
            assert endpoint.path
            self.sock = bind_private_unix(endpoint.path)
        else:
            try:
                infos = socket.getaddrinfo(
                    endpoint.host or "localhost", endpoint.port, type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE,
                )
                family, _, _, _, address = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(4)
            except OSError as exc:
                raise TransportError(
                    f"cannot listen on {endpoint.host}:{endpoint.port}: {_short(exc)}"
                ) from None
            sock.setblocking(False)
            self.sock = sock
        self.fd = self.sock.fileno()

    def accept(self) -> tuple[socket.socket, str] | None:
        try:
            sock, address = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        return sock, peer_name(self.endpoint, address)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.endpoint.kind == "unix" and self.endpoint.path:
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint.path)


def _short(exc: OSError) -> str:
    return exc.strerror or str(exc)


def bind_private_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600, without a window.

    A stale socket left by a dead bridge is replaced; a live one (something
    answers) or a file that is not a socket is never touched.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise TransportError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise TransportError(f"{path}: {_short(exc)}") from None
            os.unlink(path)  # stale: nobody listens
        else:
            raise TransportError(f"{path} is in use by another program")
        finally:
            probe.close()
    directory = os.path.dirname(os.path.abspath(path))
    try:
        private = tempfile.mkdtemp(prefix=".ccidbridge-", dir=directory)  # mode 0700
    except OSError as exc:
        raise TransportError(f"cannot create the socket in {directory}: {_short(exc)}") from None
    tmp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {path}: {_short(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
    sock.setblocking(False)
    return sock
