"""Is a card's socket in use, and is our own bridge listening on it yet? (docs/lifecycle.md#H5)

A TCP listener shows in /proc/net/tcp.  A Unix one does not show under its
path when it is the bridge's: the bridge binds in a private directory and
renames the socket into place (runtime.transport), and /proc/net/unix keeps
the name it was bound with.  So another program's Unix socket is probed by
connecting (as the transport itself does before replacing a stale one), and
our own bridge's by the socket file that appears at the path: it binds,
renames and listens in one step on the event loop, so once a new socket file
is there, it listens.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from ccidbridge.spec import Endpoint

_TCP_LISTEN = "0A"


def tcp_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def socket_file(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the Unix socket file at ``path``, None if there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def in_use(ep: Endpoint) -> bool:
    """Does another program listen on the endpoint's socket?"""
    if ep.kind == "tcp":
        return ep.port is not None and tcp_listening(ep.port)
    if ep.path is None or socket_file(ep.path) is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        with contextlib.suppress(OSError):
            probe.connect(ep.path)
            return True
    return False


def now_listening(ep: Endpoint, before: tuple[int, int] | None) -> bool:
    """Our bridge listens: a TCP listener, or a Unix socket file other than ``before``."""
    if ep.kind == "tcp":
        return ep.port is not None and tcp_listening(ep.port)
    current = socket_file(ep.path or "")
    return current is not None and current != before
