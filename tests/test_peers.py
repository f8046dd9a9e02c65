"""Unix socket hygiene (runtime/peers.py, U1 and U2): where a socket may live and
who may be at its other end — checked with real sockets and a real second user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidbridge.runtime import peers
from ccidbridge.runtime.transport import TransportError
from ccidbridge.spec import Endpoint
from lab.device_peer import DevicePeer
from lab.instant_card import InstantCard
from tests.bridgeharness import RunningBridge, served_card

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")

#: A peer running as ``nobody``: listens (or connects) on argv[1], reports what it received.
_NOBODY_PEER = """
import socket, sys
path, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
if mode == "listen":
    s.bind(path); s.listen(1); s.settimeout(10)
    conn, _ = s.accept()
else:
    s.connect(path); conn = s
conn.settimeout(2)
got = b""
try:
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            break
        got += chunk
except OSError:
    pass
print(len(got), flush=True)
"""


def _as_nobody(path: str, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/usr/bin/python3", "-c", _NOBODY_PEER, path, mode],  # ours is under /root
        user=NOBODY,
        group=NOBODY,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700 all the way up)."""
    path = Path(tempfile.mkdtemp(prefix="ccidbridge-peers-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_directory_rules(tmp_path) -> None:
    trusted = frozenset({os.getuid()})
    fine = tmp_path / "fine"
    fine.mkdir(mode=0o755)
    assert peers.directory_problem(str(fine / "s"), trusted) is None
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert "writable by others" in peers.directory_problem(str(open_dir / "s"), trusted)
    open_dir.chmod(0o1777)  # sticky, like /tmp: others cannot replace our socket
    assert peers.directory_problem(str(open_dir / "s"), trusted) is None
    assert peers.directory_problem(str(tmp_path / "missing" / "s"), trusted) is None


@needs_root
def test_a_directory_owned_by_another_user_is_refused(tmp_path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    problem = peers.directory_problem(str(theirs / "s"), peers.default_peer_uids())
    assert problem and "owned by nobody (uid 65534)" in problem
    with pytest.raises(TransportError, match="owned by nobody"):
        RunningBridge(served_card(Endpoint("unix", True, path=str(theirs / "s"))), InstantCard())


def test_listening_in_a_world_writable_directory_is_refused(tmp_path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(TransportError, match="writable by others"):
        RunningBridge(served_card(Endpoint("unix", True, path=str(open_dir / "s"))), InstantCard())


@needs_root
def test_the_bridge_refuses_to_serve_a_listening_peer_of_another_user(open_tmp: Path) -> None:
    """Connect mode: a socket someone else listens on gets no byte from the bridge."""
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # sticky: nobody may create a socket here, but not replace ours
    path = str(shared / "vsc.sock")
    intruder = _as_nobody(path, "listen")
    try:
        with RunningBridge(served_card(Endpoint("unix", False, path=path)), InstantCard()) as b:
            line = b.wait_log("refused the peer", timeout=10)
            assert "nobody (uid 65534)" in line
            out, _ = intruder.communicate(timeout=10)
            assert out.strip() == "0"  # not even the Init
            os.unlink(path)
            with DevicePeer("unix", path=path) as peer:  # root: accepted
                peer.wait_card(True, timeout=5)
    finally:
        if intruder.poll() is None:
            intruder.kill()
            intruder.wait()


@needs_root
def test_the_bridge_refuses_a_connecting_peer_of_another_user(open_tmp: Path) -> None:
    """Listen mode: even if the 0600 socket were opened up, another user gets nothing."""
    path = str(open_tmp / "vsc.sock")
    with RunningBridge(served_card(Endpoint("unix", True, path=path)), InstantCard()) as b:
        b.wait_log("listening on")
        os.chmod(path, 0o666)  # a mistake by hand: the uid check still holds
        intruder = _as_nobody(path, "connect")
        out, _ = intruder.communicate(timeout=10)
        assert out.strip() == "0"
        assert "nobody (uid 65534)" in b.wait_log("refused the peer")
        with DevicePeer("unix", listen=False, path=path) as peer:
            peer.wait_card(True)
