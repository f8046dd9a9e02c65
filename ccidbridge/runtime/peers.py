"""Who may be on the other end of a Unix socket, and where such a socket may live.

A card is as good as a key: whoever reaches the socket can use it.  So, on
Unix sockets, both when the bridge listens and when it connects:

U1  The socket's directory must be trustworthy: owned by root, by us or by a
    user we accept as a peer, and not writable by others unless sticky
    (``/tmp``-style).  Otherwise another user could put their own socket
    there (and get the card) or remove ours.
U2  The connected peer's credentials (SO_PEERCRED) must name an accepted
    user: by default root, the user the bridge runs as, and the user libvirt
    runs QEMU as (``libvirt-qemu`` on Debian and Ubuntu, ``qemu`` on Fedora
    and Arch, where those users exist).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterable

#: The users libvirt's QEMU runs as on the distributions we serve (U2).
QEMU_USERS = ("libvirt-qemu", "qemu")


def default_peer_uids() -> frozenset[int]:
    """U2's default: root, ourselves, and libvirt's QEMU user where it exists."""
    uids = {0, os.getuid()}
    for name in QEMU_USERS:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(name).pw_uid)
    return frozenset(uids)


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def describe_uids(uids: Iterable[int]) -> str:
    return ", ".join(user_name(u) for u in sorted(uids))


def directory_problem(path: str, trusted: frozenset[int]) -> str | None:
    """U1 for the directory holding socket ``path``: None if fine, else why not.

    A directory that does not exist (yet) is no problem here: connecting or
    binding will say so.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check {directory}: {exc.strerror}"
    if st.st_uid not in trusted:
        return (
            f"{directory} is owned by {user_name(st.st_uid)}, who is not an accepted peer "
            f"({describe_uids(trusted)}): they could replace the socket"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (
            f"{directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}) and not "
            "sticky: anyone could replace the socket; use a directory only its owner can write"
        )
    return None


_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (U2)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(data)[1])
