"""The runtime tests that matter, against the real QEMU of every stack: 7.2 (this machine),
10.0 (Debian 13) and 11.1 (sid), chrooted in their roots (lab.stacks).

QEMU runs alone (no guest, docs/lab.md#V11); its passthru debug
output (``QEMU_CCID_PASSTHRU_DEBUG=4``) shows what it accepted.  The guest-side
view of the same events is tests/test_stacks_guest.py.  The card is the
instant card, or our vpcd test card in the private pcscd where a card must come
and go.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ccidbridge.card.pcsc import PcscCard
from ccidbridge.config.model import Endpoint, ReaderSpec
from lab.bridgeproc import BridgeProcess, write_config
from lab.instant_card import InstantCard
from lab.qemu import QemuPassthru, TcpEndpoint, UnixEndpoint, free_tcp_port
from lab.stacks import Stack
from tests.bridgeharness import RunningBridge, served_card

pytestmark = pytest.mark.qemu


@pytest.fixture
def stack_qemu(qemu_passthru, qemu_stack: Stack) -> Callable[..., QemuPassthru]:  # noqa: ANN001
    """``qemu_passthru`` (tests/fixtures_stack.py) with ``qemu_stack``'s QEMU, debug on."""

    def make(transport: str = "tcp", **kwargs: Any) -> QemuPassthru:
        kwargs.setdefault("debug", True)
        return qemu_passthru(transport, stack=qemu_stack, **kwargs)

    return make


def wait_qemu_says(qemu: QemuPassthru, needle: str, count: int = 1, timeout: float = 10) -> None:
    """Until QEMU's debug output holds ``needle`` ``count`` times (bounded, not timed)."""
    deadline = time.monotonic() + timeout
    while qemu.stdout().count(needle) < count:
        assert time.monotonic() < deadline, f"QEMU never said {needle!r}:\n{qemu.stdout()[-2000:]}"
        time.sleep(0.02)


def _bridge_side(ep: TcpEndpoint | UnixEndpoint, listens: bool) -> Endpoint:
    if isinstance(ep, UnixEndpoint):
        return Endpoint("unix", listens, path=ep.path)
    return Endpoint("tcp", listens, host=ep.host, port=ep.port)


def test_qemu_is_the_stacks_own(qemu_stack: Stack) -> None:
    assert f"version {qemu_stack.qemu}." in qemu_stack.version_output()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_handshake_acked_bridge_connecting(stack_qemu, kind: str) -> None:  # noqa: ANN001
    qemu = stack_qemu(kind)
    with RunningBridge(served_card(_bridge_side(qemu.endpoint, listens=False)),
                       InstantCard()) as b:
        b.wait_synced(10)
        b.wait_log("AtrAccepted")
    assert "VSC_ATR" in qemu.stdout()  # QEMU's own debug line for the ATR it accepted


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_handshake_acked_qemu_connecting(stack_qemu, tmp_path: Path,  # noqa: ANN001
                                         kind: str) -> None:
    ep = UnixEndpoint(str(tmp_path / "b.sock")) if kind == "unix" else TcpEndpoint(free_tcp_port())
    with RunningBridge(served_card(_bridge_side(ep, listens=True)), InstantCard()) as b:
        b.wait_log("listening on")
        stack_qemu(kind, server=False, endpoints=[ep])
        b.wait_synced(10)
        if kind == "unix":
            assert stat.S_IMODE(os.stat(ep.path).st_mode) == 0o600


def test_card_pull_and_insert_reach_qemu(stack_qemu, test_card) -> None:  # noqa: ANN001
    """The card leaves the host reader: QEMU detaches it; it comes back: a new ATR."""
    card = test_card("dual")
    qemu = stack_qemu("unix")
    spec = ReaderSpec(name=card.reader)
    with RunningBridge(served_card(_bridge_side(qemu.endpoint, listens=False), spec),
                       PcscCard(spec)) as b:
        b.wait_synced(10)
        wait_qemu_says(qemu, "VSC_ATR")
        card.remove()
        wait_qemu_says(qemu, "VSC_CardRemove")
        card.insert()
        wait_qemu_says(qemu, "VSC_ATR", 2)
        out = qemu.stdout()
        assert out.index("VSC_CardRemove") < out.rindex("VSC_ATR")
        assert "atr passes check" in out[out.index("VSC_CardRemove"):]


def test_qemu_restart_resyncs(stack_qemu) -> None:  # noqa: ANN001
    first = stack_qemu("tcp")
    ep = first.endpoint
    with RunningBridge(served_card(_bridge_side(ep, listens=False)), InstantCard()) as b:
        b.wait_synced(10)
        first.kill()
        b.wait(lambda br: not br.connected.is_set(), 10)
        second = stack_qemu("tcp", endpoints=[ep])
        b.wait(lambda br: br.connected.is_set(), 15)
        b.wait_synced(10)
        assert "VSC_ATR" in second.stdout()


def test_sigterm_says_goodbye_to_qemu(stack_qemu, test_card, tmp_path: Path) -> None:  # noqa: ANN001
    card = test_card("dual")
    sock = tmp_path / "vsc.sock"
    qemu = stack_qemu("unix", endpoints=[UnixEndpoint(str(sock))])
    config = write_config(tmp_path / "vm.xml", sock, card.reader)
    bridge = BridgeProcess(config, tmp_path / "bridge.log", verbose=2)
    with bridge:
        bridge.wait_log("QEMU synchronized", 15)
        assert "VSC_CardRemove" not in qemu.stdout()
        assert bridge.stop(signal.SIGTERM) == 0
    # the goodbye: QEMU detached the card (CardRemove) and acked in time
    assert "VSC_CardRemove" in qemu.stdout().split("atr passes check", 1)[1]
    assert "stopping: telling QEMU the cards are gone" in bridge.text()
    assert "did not acknowledge" not in bridge.text()
