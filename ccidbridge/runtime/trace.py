"""``ccidbridge run --trace FILE``: every APDU as JSON lines, redacted, bounded.

One :class:`TraceFile` per run, shared by every card; each card's bridge
writes through its own :class:`CardTrace`, on its APDU thread (the thread that
has the APDU and its answer in hand, so tracing costs no hand-off).  Two lines
per exchange, one per direction::

  {"t": 1764625000.123456, "card": "vm.xml:3 smartcard0", "dir": "command",
   "cla": "00", "ins": "A4", "p1": "04", "p2": "00", "len": 11}
  {"t": 1764625000.123601, "card": "vm.xml:3 smartcard0", "dir": "response",
   "len": 2, "sw": "9000", "us": 145}

(``us``: the card's answer time in microseconds.)

``"data"`` (hex) is added only at ``-vv`` and only where the log's one rule
allows it (apdulog.shown_command_data / shown_response_data: never for a PIN
command nor its answer).  A command the bridge answered itself has
``"by": "policy"`` or ``"pin-guard"`` in its response line; one the card
did not answer has ``"error"`` instead of ``"sw"``.

T1  The file is created (or truncated) mode 0600, never through a symlink.
T2  It grows to at most ``max_bytes``: the line that would pass the limit is
    replaced by one ``{"trace": "stopped", ...}`` line, tracing stops, and the
    log says so once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

from ccidbridge.runtime import apdulog

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Room kept for the closing line (T2).
_CLOSING_ROOM = 256

log = logging.getLogger("ccidbridge")


class TraceError(Exception):
    """The trace file cannot be opened; ``str()`` is one line for the user."""


class TraceFile:
    """The trace of one run (T1, T2); any thread may write (a lock keeps lines whole)."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 with_data: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.with_data = with_data
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self._fd = os.open(path, flags, 0o600)
            os.fchmod(self._fd, 0o600)  # an existing file keeps its mode otherwise
        except OSError as exc:
            raise TraceError(f"cannot write the trace {path}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()
        self._written = 0
        self.stopped = False

    def card(self, label: str) -> CardTrace:
        return CardTrace(self, label)

    def write(self, text: str) -> None:
        data = text.encode()
        with self._lock:
            if self.stopped:
                return
            if self._written + len(data) > self.max_bytes - _CLOSING_ROOM:
                self.stopped = True
                data = (json.dumps({"t": round(time.time(), 6), "trace": "stopped",
                                    "reason": f"the trace reached {self.max_bytes} bytes "
                                    "(--trace-max-bytes)"}) + "\n").encode()
                log.warning("trace %s reached %d bytes: tracing stopped", self.path,
                            self.max_bytes)
            try:
                os.write(self._fd, data)
            except OSError as exc:
                self.stopped = True
                log.error("trace %s: %s; tracing stopped", self.path, exc.strerror or exc)
                return
            self._written += len(data)

    def close(self) -> None:
        with self._lock:
            self.stopped = True
            with contextlib.suppress(OSError):
                os.close(self._fd)


class CardTrace:
    """One card's lines in the trace."""

    __slots__ = ("_file", "_card", "_data")

    def __init__(self, file: TraceFile, label: str) -> None:
        self._file = file
        self._card = json.dumps(label)
        self._data = file.with_data

    def exchange(self, apdu: bytes, response: bytes | None, started: float,
                 error: str = "", by: str = "") -> None:
        """One guest command and what answered it (``started``: time.monotonic()).

        Built from plain concatenation: format specs (``:02X``, ``:.6f``) cost
        about a microsecond each on the APDU thread (benchmarks/safety.py).
        """
        if self._file.stopped:
            return
        us = int((time.monotonic() - started) * 1_000_000)
        now = time.time_ns() // 1000
        card = self._card
        head = '{"t": ' + _seconds(now - us) + ', "card": ' + card + ', "dir": "command"'
        if len(apdu) >= 4:
            h = apdu[:4].hex().upper()
            head += (', "cla": "' + h[0:2] + '", "ins": "' + h[2:4] + '", "p1": "' + h[4:6]
                     + '", "p2": "' + h[6:8] + '"')
        head += ', "len": ' + str(len(apdu))
        data = apdulog.shown_command_data(apdu, self._data)
        if data is not None:
            head += ', "data": "' + data.hex() + '"'
        tail = '{"t": ' + _seconds(now) + ', "card": ' + card + ', "dir": "response"'
        if response is None:
            tail += ', "error": ' + json.dumps(error)
        else:
            tail += ', "len": ' + str(len(response))
            if len(response) >= 2:
                tail += ', "sw": "' + response[-2:].hex().upper() + '"'
            rdata = apdulog.shown_response_data(response, self._data, apdu)
            if rdata is not None:
                tail += ', "data": "' + rdata.hex() + '"'
        if by:
            tail += ', "by": "' + by + '"'
        self._file.write(head + "}\n" + tail + ', "us": ' + str(us) + "}\n")


def _seconds(us: int) -> str:
    """Microseconds since the epoch as seconds with six decimals, e.g. 1764625000.123456."""
    text = str(us)
    return text[:-6] + "." + text[-6:]


__all__ = ["DEFAULT_MAX_BYTES", "CardTrace", "TraceError", "TraceFile"]
