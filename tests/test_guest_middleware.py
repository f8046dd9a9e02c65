"""Real middleware in a real guest, through `ccidbridge run` with the default
config, against the same card directly on the host: the outputs must match.

Each test runs a list of middleware commands on the host first (the lab's
private pcscd, a private GNUPGHOME), restarts the card so the guest gets the
same fresh card, then boots the middleware guest (lab/guest/middleware.py)
through the bridge and runs the same commands there.  Outputs are compared
line by line after the documented differences are normalised: the reader's
name and the ATR the bridge announces for a T=1-only card
(docs/compatibility.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ccidbridge.protocol.atr import announce_t0
from lab.bridgeproc import BridgeProcess, device_args, write_config
from lab.guest.middleware import CommandResult, MiddlewareRun, gnupg_home, run_commands, run_on_host

pytestmark = [pytest.mark.guest, pytest.mark.stack]

VICC_ATR = bytes.fromhex("3B9513810180 73FF01000B".replace(" ", ""))


def colon_hex(data: bytes) -> str:
    return data.hex(":")


def normalise(text: str, readers: tuple[str, ...], atrs: dict[bytes, str]) -> str:
    """The output with the reader names and the known ATR spellings replaced."""
    for reader in readers:
        text = text.replace(reader, "<reader>")
    for atr, name in atrs.items():
        for spelling in (atr.hex(":"), atr.hex(" ").upper(), atr.hex(" "), atr.hex(),
                         atr.hex().upper(), atr.hex(":").upper()):
            text = text.replace(spelling, name)
    return text


class Middleware:
    """One card's host-direct and in-guest runs of the same commands."""

    def __init__(self, tmp: Path, reader: str, image, **reader_attrs: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.reader = reader
        self.image = image
        self.config = write_config(tmp / "vm.xml", tmp / "vsc.sock", reader, **reader_attrs)
        self.args = device_args(self.config)
        self.host_env = gnupg_home(tmp / "host")
        self.bridge: BridgeProcess | None = None

    def on_host(self, commands: list[str]) -> list[CommandResult]:
        return run_on_host(commands, self.host_env)

    def in_guest(self, commands: list[str], timeout: float = 150.0) -> MiddlewareRun:
        self.bridge = BridgeProcess(self.config, self.tmp / "bridge.log", verbose=1)
        try:
            return run_commands(self.image, self.args, commands, timeout).check()
        finally:
            self.bridge.stop()

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.__exit__(None, None, None)


@pytest.fixture
def middleware(tmp_path: Path, middleware_image):
    made: list[Middleware] = []

    def make(reader: str, **attrs: str) -> Middleware:
        m = Middleware(tmp_path / f"m{len(made)}", reader, middleware_image, **attrs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def assert_same(host: list[CommandResult], run: MiddlewareRun, reader: str,
                atrs: dict[bytes, str]) -> None:
    """Every command: the same exit status and the same output, normalised."""
    assert run.run.reader, "the guest client printed no reader"
    readers = (reader, run.run.reader)
    for h, g in zip(host, run.results, strict=True):
        assert g.rc == h.rc, f"{h.command}: rc host {h.rc}, guest {g.rc}\n{h.output}\n{g.output}"
        assert normalise(g.output, readers, atrs) == normalise(h.output, readers, atrs), h.command


OPENSC_BASIC = ["opensc-tool -a", "opensc-tool -n", "pkcs15-tool -D"]


def test_opensc_on_vicc_iso7816_matches_the_host(vicc_card, middleware) -> None:
    m = middleware(vicc_card.reader)
    host = m.on_host(OPENSC_BASIC)
    assert host[0].rc == 0 and colon_hex(VICC_ATR) in host[0].output
    vicc_card.stop()
    vicc_card.start()
    run = m.in_guest(OPENSC_BASIC)
    guest = run.results
    assert run.run.atr == announce_t0(VICC_ATR)
    assert colon_hex(announce_t0(VICC_ATR)) in guest[0].output
    assert_same(host, run, vicc_card.reader,
                {VICC_ATR: "<atr>", announce_t0(VICC_ATR): "<atr>"})
