"""Real QEMU (7.2, 10.0 and 11.1: every stack) started with ``ccidbridge qemu-argv --usb``
output for the examples, rendered for that stack's QEMU and libvirt.

Each example's ports and socket paths are swapped for private ones; QEMU must
start, show every card in ``info qtree`` / ``info usb``, and every card the
config serves must answer the bridge's VSCard handshake (Init, ReaderAdd) at
the endpoint ``Config.served_cards()`` names.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import time
from pathlib import Path

import pytest

from ccidbridge.config import loads
from ccidbridge.config.layout import layout
from ccidbridge.config.qemu_argv import render
from lab.examples_regen import EXAMPLES
from lab.qemu import Qemu, free_tcp_port, tcp_listening, unix_listening
from tests.fixtures_libvirt import output_domain, target

pytestmark = pytest.mark.qemu
BASE = ["-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64"]
INIT = bytes.fromhex("00000001 00000000 0000000c 56534344 00000002 00000000")
INIT_REPLY = bytes.fromhex("00000001 ffffffff 0000000c 56534344 00000002 00000000")
READER_ADD = bytes.fromhex("00000003 ffffffff 00000000")
READER_ADD_REPLY = bytes.fromhex("00000002 00000000 00000004 00000000")


@pytest.fixture(autouse=True)
def _isolated() -> None:
    if os.environ.get("CCIDBRIDGE_ISOLATED") != "1":
        pytest.fail("QEMU tests run inside .ci/isolated (private network and /run)",
                    pytrace=False)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} bytes: {buf.hex()}")
        buf += chunk
    return buf


def _handshake(s: socket.socket, unsolicited_init: bool = False) -> None:
    """Init and ReaderAdd; QEMU's own Init comes first when it was connected at realize."""
    s.settimeout(10)
    if unsolicited_init:
        assert _recv_exact(s, len(INIT_REPLY)) == INIT_REPLY
    s.sendall(INIT)
    assert _recv_exact(s, len(INIT_REPLY)) == INIT_REPLY
    s.sendall(READER_ADD)
    assert _recv_exact(s, len(READER_ADD_REPLY)) == READER_ADD_REPLY


def _private(text: str, tmp: Path) -> str:
    """The example with free TCP ports and socket paths under ``tmp``."""
    text = re.sub(r"service='\d+'", lambda _: f"service='{free_tcp_port()}'", text)
    return re.sub(r"path='[^']*/([^'/]+)'", lambda m: f"path='{tmp / m.group(1)}'", text)


@pytest.mark.parametrize("name", ["tcp-bind", "tcp-connect", "unix", "reconnect", "two-cards"])
def test_qemu_starts_and_every_card_answers(qemu_stack, tmp_path: Path,  # noqa: ANN001
                                            name: str) -> None:
    config = loads(_private((EXAMPLES / f"{name}.xml").read_text(), tmp_path), f"{name}.xml")
    cards = config.served_cards()
    assert cards
    listeners = {}
    for card in cards:  # connect mode: the bridge listens before QEMU dials
        ep = card.endpoint
        if ep.bridge_listens:
            family = socket.AF_INET if ep.kind == "tcp" else socket.AF_UNIX
            srv = socket.socket(family, socket.SOCK_STREAM)
            srv.bind((ep.host, ep.port) if ep.kind == "tcp" else ep.path)
            srv.listen(1)
            srv.settimeout(10)
            listeners[card.label] = srv
    version = target(qemu_stack)
    lay = layout(config.devices, version.libvirt)
    args = BASE + shlex.split(render(lay, version, add_usb=True))
    with Qemu(args, workdir=tmp_path / "qemu", stack=qemu_stack) as qemu:
        qtree = qemu.hmp("info qtree")
        usb = qemu.hmp("info usb")
        for placed in lay.cards:
            assert f'dev: ccid-card-passthru, id "{placed.alias}"' in qtree
            assert f"ID: ccid{placed.controller}" in usb
        for card in cards:
            ep = card.endpoint
            if ep.bridge_listens:
                conn, _ = listeners.pop(card.label).accept()
            else:
                for _ in range(500):
                    if (tcp_listening(ep.port) if ep.kind == "tcp"
                            else unix_listening(ep.path)):
                        break
                    qemu.hmp("info status")
                if ep.kind == "tcp":
                    conn = socket.create_connection((ep.host, ep.port), timeout=10)
                else:
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    conn.connect(ep.path)
            src = next(p.card.chardev.source for p in lay.cards
                       if config.path + f":{p.card.line} {p.alias}" == card.label)
            with conn:
                # a client chardev without reconnect is connected when the card realizes,
                # so QEMU's Init reaches the bridge (otherwise it is dropped unseen)
                _handshake(conn, unsolicited_init=ep.bridge_listens and src.reconnect is None)
    for srv in listeners.values():
        srv.close()


def test_qemu_starts_with_spicevmc_example(qemu_stack, tmp_path: Path) -> None:  # noqa: ANN001
    """The spicevmc card and agent channel exist once QEMU has SPICE (libvirt adds -spice)."""
    config = loads((EXAMPLES / "spicevmc.xml").read_text(), "spicevmc.xml")
    port = free_tcp_port()
    args = BASE + ["-spice", f"port={port},addr=127.0.0.1,disable-ticketing=on"] + shlex.split(
        render(layout(config.devices), target(qemu_stack), add_usb=True))
    with Qemu(args, workdir=tmp_path / "qemu", stack=qemu_stack) as qemu:
        qtree = qemu.hmp("info qtree")
        assert 'dev: ccid-card-passthru, id "smartcard0"' in qtree
        assert 'dev: virtserialport, id "channel0"' in qtree
        chardevs = {c["label"]: c["filename"] for c in qemu.qmp("query-chardev")}
        assert chardevs["charsmartcard0"].startswith("spicevmc")
        assert chardevs["charchannel0"].startswith("spicevmc")


def _wait_listening(ep, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not (tcp_listening(ep.port) if ep.kind == "tcp" else unix_listening(ep.path)):
        assert time.monotonic() < deadline, f"nobody listens on {ep.describe()}"
        time.sleep(0.01)


@pytest.mark.libvirt
def test_libvirt_starts_two_cards_and_both_answer(libvirtd, tmp_path: Path) -> None:
    """``virsh create`` with the two-cards output (one <smartcard> + <qemu:commandline>)."""
    config = loads(_private((EXAMPLES / "two-cards.xml").read_text(), tmp_path), "two.xml")
    version = target(libvirtd.stack)
    lay = layout(config.devices, version.libvirt)
    domain = output_domain(lay, version).replace(
        "<name>ccidbridge-oracle</name>", "<name>ccidbridge-two-cards</name>")
    started = libvirtd.create(domain)
    assert started.returncode == 0, started.stderr + libvirtd.qemu_log("ccidbridge-two-cards")
    try:
        cards = config.served_cards()
        assert len(cards) == 2
        for card in cards:
            ep = card.endpoint
            assert not ep.bridge_listens
            _wait_listening(ep)
            if ep.kind == "tcp":
                conn = socket.create_connection((ep.host, ep.port), timeout=10)
            else:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(ep.path)
            with conn:
                _handshake(conn)
    finally:
        libvirtd.destroy("ccidbridge-two-cards")
