"""Remote use without TLS: QEMU's Unix chardev on the "VM host" behind a private
sshd, forwarded with ``ssh -L LOCAL:REMOTE`` to the "user's machine", where
``ccidbridge run`` serves the card through the local end of the forward.

Both hosts are this namespace; what crosses between them is only sshd's TCP
port on 127.0.0.1.  The bridge accepts the forward's local socket because the
ssh client created it as the bridge's own user (runtime/peers.py, U1/U2).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from lab.bridgeproc import BridgeProcess, device_args
from lab.pcsc import direct_transmit
from lab.qemu import QemuPassthru
from lab.sshd import PrivateSshd, SshError
from tests.fixtures_stack import missing, require_isolation
from tests.test_guest import APDUS

pytestmark = pytest.mark.stack


def config(path: Path, socket_path: Path, reader: str) -> Path:
    path.write_text(
        "<ccidbridge>\n  <smartcard mode='passthrough' type='unix'>\n"
        f"    <source mode='bind' path={quoteattr(str(socket_path))}/>\n"
        "    <address type='ccid' controller='0' slot='0'/>\n"
        f"    <reader name={quoteattr(reader)}/>\n  </smartcard>\n</ccidbridge>\n")
    return path


@pytest.fixture
def sshd(tmp_path: Path):
    require_isolation()
    server = PrivateSshd(tmp_path / "vmhost-ssh")
    try:
        server.start()
    except SshError as exc:
        missing(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.mark.qemu
def test_real_qemu_acks_the_handshake_through_an_ssh_forward(
    test_card, sshd: PrivateSshd, qemu_passthru, tmp_path
) -> None:
    card = test_card("dual")
    qemu: QemuPassthru = qemu_passthru("unix", debug=True)  # listens on the "VM host"
    remote = qemu.endpoint.path  # type: ignore[attr-defined]
    user = tmp_path / "user"
    user.mkdir(mode=0o700)
    local = user / "vm.sock"
    sshd.forward_local(str(local), remote)
    assert stat.S_IMODE(os.stat(local).st_mode) == 0o600  # StreamLocalBindMask=0177
    with BridgeProcess(config(user / "vm.xml", local, card.reader), user / "bridge.log") as b:
        b.wait_log("connected to QEMU")
        b.wait_log("QEMU synchronized (card present)", timeout=15)
        b.stop()
    assert "VSC_ATR" in qemu.stdout()  # QEMU's own debug line: it got the ATR via sshd
    assert "refused" not in b.text()


@pytest.mark.guest
def test_the_guest_reads_the_card_through_an_ssh_forward(
    test_card, sshd: PrivateSshd, boot_guest, tmp_path
) -> None:
    card = test_card("dual")
    expected = direct_transmit(card.reader, [bytes.fromhex(a) for a in APDUS])
    card.restart()
    vmhost = tmp_path / "vmhost"
    vmhost.mkdir(mode=0o700)
    remote = vmhost / "vsc.sock"
    user = tmp_path / "user"
    user.mkdir(mode=0o700)
    local = user / "vm.sock"
    # QEMU on the VM host listens on ``remote`` (mode='bind'); the bridge, on the
    # user's machine, connects to ``local``, which ssh forwards to ``remote``.
    qemu_args = device_args(config(vmhost / "vm.xml", remote, card.reader))
    sshd.forward_local(str(local), str(remote))
    with BridgeProcess(config(user / "vm.xml", local, card.reader), user / "bridge.log") as b:
        run = boot_guest(qemu_args, apdus=APDUS, timeout=60).check()
        assert [x.response for x in run.apdus] == expected
        assert "QEMU synchronized (card present)" in b.text()
