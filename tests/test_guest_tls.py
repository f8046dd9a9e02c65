"""A real guest reads the card over a TLS chardev: `ccidbridge qemu-argv` of a
tls='yes' config, QEMU's tls-creds-x509 listening, `ccidbridge run` connecting
with its own <tls> certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccidbridge.config.model import DEFAULT_TLS_DIR
from lab.bridgeproc import BridgeProcess, device_args
from lab.pcsc import direct_transmit
from lab.qemu import free_tcp_port
from lab.tlscerts import Pki
from lab.vpcd_card import ATR_PRESETS

pytestmark = [pytest.mark.guest, pytest.mark.stack]

APDUS = ["00A4040C07A0000000030000", "00B0000010", "0084000008", "80100000020102"]


def test_guest_reads_the_card_over_tls(test_card, boot_guest, tmp_path: Path) -> None:
    card = test_card("dual")
    expected = direct_transmit(card.reader, [bytes.fromhex(a) for a in APDUS])
    card.restart()
    pki = Pki(tmp_path / "pki")
    qemu_creds = pki.creds("127.0.0.1", "server")
    bridge_creds = pki.creds("ccidbridge", "client")
    port = free_tcp_port()
    config = tmp_path / "vm.xml"
    config.write_text(
        "<ccidbridge>\n"
        "  <smartcard mode='passthrough' type='tcp'>\n"
        f"    <source mode='bind' host='127.0.0.1' service='{port}' tls='yes'/>\n"
        f"    <tls dir='{bridge_creds}' peer-names='127.0.0.1'/>\n"
        f"    <reader name='{card.reader}'/>\n"
        "  </smartcard>\n"
        "</ccidbridge>\n"
    )
    args = device_args(config)
    joined = " ".join(args)
    # libvirt's directory (qemu.conf chardev_tls_x509_cert_dir); this QEMU's is a temporary one
    assert "tls-creds-x509" in joined and DEFAULT_TLS_DIR in joined
    args = [a.replace(DEFAULT_TLS_DIR, str(qemu_creds)) for a in args]
    with BridgeProcess(config, tmp_path / "bridge.log", verbose=1) as bridge:
        run = boot_guest(args, apdus=APDUS, timeout=40).check()
        assert "names 127.0.0.1" in bridge.wait_log("whose certificate names")
    assert run.atr == ATR_PRESETS["dual"]
    assert [x.response for x in run.apdus] == expected
