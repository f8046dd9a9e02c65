"""The socket side: meet QEMU's chardev over TCP or a Unix socket.

libvirt's ``<source mode='bind'>`` makes QEMU listen, so the bridge connects
(and reconnects, with a backoff capped at 0.5 s, for as long as it runs);
``mode='connect'`` makes QEMU connect (``reconnect=``), so the bridge
listens.  One peer per card at a time: while a connection is up a second one
is refused (closed at once, logged) and the first keeps working.

Security by default: a listening Unix socket is created 0600 (bound in a
private 0700 directory, then renamed into place, so there is no window where
it is open to others); a listening TCP socket on an address that is not
loopback is allowed only because the config says so, and the log warns that
the card is then reachable from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import tempfile
from typing import Protocol

from ccidbridge.spec import Endpoint

#: Reconnect backoff: first retry after this, doubling up to RETRY_MAX.  The
#: cap bounds how long a restarted QEMU waits for us (issue 6: <= 1 s from
#: QEMU listening to the ATR acked, and the ATR itself waits
#: qemu.REINSERT_PAUSE after the resync).  A refused connect on loopback costs
#: microseconds.
RETRY_MIN = 0.05
RETRY_MAX = 0.25


class TransportError(Exception):
    """The endpoint cannot be used at all (bad path, address in use, ...)."""


class Peer(Protocol):
    """What a bridge does with its one connection."""

    def connection_up(self, transport: asyncio.Transport, peer: str) -> None: ...
    def data(self, data: bytes) -> None: ...
    def connection_down(self, reason: str) -> None: ...


class _Connection(asyncio.Protocol):
    """Forwards one socket's events to the bridge; cheap on the data path."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.data_received = link.peer.data  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp:
            # Small frames, each awaited by the other side: no Nagle stalls.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._link.claim(self):
            transport.abort()
            self.data_received = lambda data: None  # type: ignore[method-assign]
            return
        if tcp and hasattr(socket, "TCP_QUICKACK"):
            # QEMU's socket chardev has Nagle on (nodelay=off by default) and
            # writes a frame's header and payload with two writes, so the
            # payload waits for our ACK of the header — which delayed ACK holds
            # back ~40 ms.  Measured: the handshake over TCP took 90 ms instead
            # of 0.5 ms (benchmarks, recovery).  Re-arm QUICKACK after every read
            # (Linux drops it by itself), as vpcd cards must (test-stack.md §3).
            setsockopt, peer_data = sock.setsockopt, self._link.peer.data
            level, opt = socket.IPPROTO_TCP, socket.TCP_QUICKACK

            def data_received(data: bytes) -> None:
                setsockopt(level, opt, 1)
                peer_data(data)

            self.data_received = data_received  # type: ignore[method-assign]
        self.transport = transport
        self._link.peer.connection_up(transport, _peer_name(transport, self._link.endpoint))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport = None
            self._link.release(self, f"{exc}" if exc else "closed by peer")
        if not self.closed.done():
            self.closed.set_result(None)


def _peer_name(transport: asyncio.BaseTransport, endpoint: Endpoint) -> str:
    if endpoint.kind == "unix":
        return endpoint.path or "unix socket"
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Link:
    """Keeps one card's connection to QEMU up, in either direction."""

    def __init__(self, endpoint: Endpoint, peer: Peer, log: logging.Logger) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.log = log
        self._active: _Connection | None = None
        self._server: asyncio.AbstractServer | None = None
        self._closing = False

    # -- one connection at a time ------------------------------------------------

    def claim(self, conn: _Connection) -> bool:
        if self._closing:
            return False
        if self._active is not None:
            self.log.warning(
                "refused a second connection on %s: the card is already served to one peer",
                self.endpoint.describe(),
            )
            return False
        self._active = conn
        return True

    def release(self, conn: _Connection, reason: str) -> None:
        if self._active is conn:
            self._active = None
            self.peer.connection_down(reason)

    def close_connection(self) -> None:
        if self._active is not None and self._active.transport is not None:
            self._active.transport.abort()

    def shut(self) -> None:
        """No new connections from now on; close the current one."""
        self._closing = True
        self.close_connection()

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or :meth:`shut`."""
        try:
            if self.endpoint.bridge_listens:
                await self._listen()
            else:
                await self._connect_forever()
        finally:
            self.close_connection()

    async def _connect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_MIN
        said_waiting = False
        ep = self.endpoint
        while not self._closing:
            try:
                if ep.kind == "unix":
                    _, conn = await loop.create_unix_connection(lambda: _Connection(self), ep.path)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self), ep.host, ep.port
                    )
            except OSError as exc:
                if not said_waiting:
                    self.log.info("waiting for QEMU on %s (%s)", ep.describe(), _short(exc))
                    said_waiting = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            said_waiting = False
            delay = RETRY_MIN
            await conn.closed

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        if ep.kind == "unix":
            assert ep.path
            sock = bind_private_unix(ep.path)
            self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        else:
            if not is_loopback(ep.host):
                self.log.warning(
                    "listening on %s:%s, which is not loopback: anyone who can reach it can "
                    "use the card",
                    ep.host,
                    ep.port,
                )
            try:
                self._server = await loop.create_server(
                    lambda: _Connection(self), ep.host, ep.port, reuse_address=True
                )
            except OSError as exc:
                raise TransportError(
                    f"cannot listen on {ep.host}:{ep.port}: {_short(exc)}"
                ) from None
        self.log.info("listening on %s", ep.describe())
        try:
            await asyncio.Future()  # until cancelled
        finally:
            self._server.close()
            self.close_connection()
            if ep.kind == "unix" and ep.path:
                with contextlib.suppress(OSError):
                    os.unlink(ep.path)


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
