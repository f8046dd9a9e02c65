"""Run Debian 12's ``/usr/bin/vicc`` with its three packaging bugs worked around.

Executed by *Debian's* ``/usr/bin/python3`` (it needs python3-pycryptodome and
python3-virtualsmartcard from dist-packages), never imported by ccidbridge.
See docs/lab.md#V9 and #V6:

1. the ``virtualsmartcard`` package is installed outside sys.path;
2. it imports ``Crypto`` while Debian ships pycryptodome as ``Cryptodome``;
3. vpcd 3.3 sends the length and the APDU in two send() calls, so with
   Nagle on its side and delayed ACK on ours every APDU stalls 44 ms; setting
   TCP_QUICKACK after every recv brings it down to ~0.2 ms.
"""

import contextlib
import runpy
import socket
import sys

VICC = "/usr/bin/vicc"
sys.path.insert(0, "/usr/lib/python3/site-packages/virtualsmartcard")

try:
    import Crypto  # noqa: F401 - a real PyCrypto/pycryptodome wins
except ImportError:
    import Cryptodome

    sys.modules["Crypto"] = Cryptodome

from virtualsmartcard import VirtualSmartcard  # noqa: E402


class _QuickAck:
    """Socket proxy that re-arms TCP_QUICKACK after each recv (Linux clears it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, n: int, *flags: int) -> bytes:
        data = self._sock.recv(n, *flags)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


_orig_connect = VirtualSmartcard.VirtualICC.connectToPort


def _connect(host: str, port: int) -> _QuickAck:
    sock = _orig_connect(host, port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _QuickAck(sock)


VirtualSmartcard.VirtualICC.connectToPort = staticmethod(_connect)

if __name__ == "__main__":
    sys.argv[0] = VICC
    runpy.run_path(VICC, run_name="__main__")
