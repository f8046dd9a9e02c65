"""Renderer and loader details the libvirt 9.0 oracle cannot produce by itself.

Expected strings are what libvirt printed (docs/libvirt-facts.md#L11, #L12): libvirt
9.0 with QEMU 7.2, its key=value variant, and upstream libvirt's QEMU >= 9.2
tests.
"""

from __future__ import annotations

import shlex

import pytest

from ccidbridge.cli import main
from ccidbridge.config import installed, loads
from ccidbridge.config.layout import layout
from ccidbridge.config.qemu_argv import NEWEST, QemuVersion, argv, render, shell_quote
from ccidbridge.spec import CardProtocol, Endpoint, Share

UNIX_RECONNECT = ("<ccidbridge><smartcard mode='passthrough' type='unix'><source mode='connect' "
                  "path='/tmp/channel/asdf'><reconnect enabled='yes' timeout='20'/></source>"
                  "</smartcard></ccidbridge>")
CERTS = ("<ccidbridge><smartcard mode='host-certificates'><certificate>cert1</certificate>"
         "<certificate>cert2</certificate><certificate>cert3</certificate></smartcard>"
         "</ccidbridge>")


def _argv(text: str, version: str, **kw: bool) -> list[str]:
    return argv(layout(loads(text).devices), QemuVersion.parse(version), **kw)


def test_reconnect_ms_from_qemu_9_2() -> None:
    """upstream chardev-reconnect.x86_64-latest.args: ``reconnect-ms=20000``."""
    new = _argv(UNIX_RECONNECT, "9.2")
    assert "socket,id=charsmartcard0,path=/tmp/channel/asdf,reconnect-ms=20000" in new
    old = _argv(UNIX_RECONNECT, "9.1")
    assert "socket,id=charsmartcard0,path=/tmp/channel/asdf,reconnect=20" in old


def test_key_value_devices_before_qemu_7() -> None:
    """As libvirt 9.0's qemuxml2argvdata has it for QEMU 6.2 (key=value,
    docs/libvirt-facts.md#L11)."""
    assert _argv(CERTS, "6.2") == [
        "-device", "usb-ccid,id=ccid0,bus=usb.0,port=1",
        "-device", "ccid-card-emulated,backend=certificates,cert1=cert1,cert2=cert2,"
        "cert3=cert3,db=/etc/pki/nssdb,id=smartcard0,bus=ccid0.0",
    ]
    assert _argv(CERTS, "7.0")[1] == '{"driver":"usb-ccid","id":"ccid0","bus":"usb.0","port":"1"}'


def test_usb_flag_adds_the_controller_first() -> None:
    args = _argv(CERTS, "7.2", add_usb=True)
    assert args[:2] == ["-device", '{"driver":"qemu-xhci","id":"usb"}']
    assert _argv(CERTS, "6.2", add_usb=True)[:2] == ["-device", "qemu-xhci,id=usb"]


@pytest.mark.parametrize(("arg", "quoted"), [
    ("-chardev", "-chardev"),
    ("socket,id=charsmartcard0,path=/tmp/a,,b", "socket,id=charsmartcard0,path=/tmp/a,,b"),
    ('{"driver":"usb-ccid"}', "'{\"driver\":\"usb-ccid\"}'"),
    ("cert1=c d", "'cert1=c d'"),
    ("it's", "'it'\\''s'"),
    ("", "''"),
])
def test_shell_quote(arg: str, quoted: str) -> None:
    assert shell_quote(arg) == quoted
    assert shlex.split(quoted) == [arg]


def test_render_is_one_shell_line() -> None:
    text = CERTS.replace("cert2<", "it's a, cert<")
    line = render(layout(loads(text).devices), QemuVersion(7, 2))
    assert line.count("\n") == 1
    assert shlex.split(line) == _argv(text, "7.2")


def test_default_qemu_version(monkeypatch) -> None:
    monkeypatch.setattr(installed.shutil, "which", lambda _: None)
    assert installed.qemu_version() == NEWEST
    monkeypatch.undo()
    if installed.shutil.which("qemu-system-x86_64"):
        assert installed.qemu_version() >= QemuVersion(7, 0)


def test_served_card_fields() -> None:
    config = loads(
        "<ccidbridge>\n"
        "  <smartcard mode='passthrough' type='tcp'>\n"
        "    <source mode='connect' host='::1' service='2001'/>\n"
        "    <reader match='Virtual*' atr='3b:00 11' atr-mask='FF FF:00' share='shared'\n"
        "            protocol='T1' rewrite-atr='no' timeout='2.5'/>\n"
        "  </smartcard>\n"
        "  <smartcard mode='passthrough' type='unix'><source mode='bind' path='/tmp/s'/>"
        "</smartcard>\n"
        "</ccidbridge>\n", "vm.xml")
    first, second = config.served_cards()
    assert first.label == "vm.xml:2 smartcard0" and first.line == 2
    assert first.source_file == "vm.xml"
    assert first.endpoint == Endpoint(kind="tcp", bridge_listens=True, host="::1", port=2001)
    r = first.reader
    assert (r.match, r.atr, r.atr_mask) == ("Virtual*", b"\x3b\x00\x11", b"\xff\xff\x00")
    assert (r.share, r.protocol, r.rewrite_atr, r.apdu_timeout, r.line) == (
        Share.SHARED, CardProtocol.T1, False, 2.5, 4)  # the line the <reader> starts on
    assert second.label == "vm.xml:7 smartcard1"
    assert second.endpoint == Endpoint(kind="unix", bridge_listens=False, path="/tmp/s")
    assert second.reader.name is None and second.reader.rewrite_atr is True
    assert second.reader.apdu_timeout == 30.0 and second.reader.share is Share.EXCLUSIVE


@pytest.mark.parametrize(("card", "reason"), [
    ("<smartcard mode='host'/>", "mode='host'"),
    ("<smartcard mode='passthrough' type='pty'/>", "pty"),
    ("<smartcard mode='passthrough' type='udp'><source host='h' service='1'/></smartcard>", "udp"),
    ("<smartcard mode='passthrough' type='file'><source path='/f'/></smartcard>", "file"),
    ("<smartcard mode='passthrough' type='spicevmc'/>", "SPICE client"),
    ("<smartcard mode='passthrough' type='tcp'><source host='::1' service='1'/>"
     "<protocol type='telnet'/></smartcard>", "telnet"),
    ("<smartcard mode='passthrough' type='tcp'><source host='h' service='1' tls='yes'/>"
     "</smartcard>", "tls='yes' needs the bridge's own certificates"),
    ("<smartcard mode='passthrough' type='tcp'><source host='192.0.2.7' service='1'/>"
     "</smartcard>", "not loopback and the chardev has no TLS"),
])
def test_unserved_reasons(card: str, reason: str) -> None:
    config = loads(f"<ccidbridge>\n{card}</ccidbridge>", "vm.xml")
    assert config.served_cards() == []
    [(label, why)] = config.unserved()
    assert label == "vm.xml:2 smartcard0" and reason in why


def test_cli_qemu_version_option(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.xml"
    cfg.write_text(CERTS)
    assert main(["qemu-argv", "--qemu-version", "6.2", "--usb", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("-device qemu-xhci,id=usb -device usb-ccid,")
    with pytest.raises(SystemExit) as exc:
        main(["qemu-argv", "--qemu-version", "seven", str(cfg)])
    assert exc.value.code == 2


def test_cleartext_on_a_network_address_is_refused_unless_said(tmp_path, capsys) -> None:
    """No card in clear text on the network by accident: check and run say FILE:LINE
    and exit 2; with <cleartext network='yes'/> it is served, and check still says so."""
    base = ("<ccidbridge>\n<smartcard mode='passthrough' type='tcp'>\n"
            "<source mode='bind' host='192.0.2.7' service='2001'/>{extra}\n"
            "</smartcard>\n</ccidbridge>\n")
    cfg = tmp_path / "vm.xml"
    cfg.write_text(base.format(extra=""))
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{cfg}:2: host='192.0.2.7' is not loopback"), err
    assert main(["run", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith(f"{cfg}:2: host='192.0.2.7' is not loopback")
    cfg.write_text(base.format(extra="<cleartext network='yes'/>"))
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "run would serve 1 card(s)" in out and "served in clear text" in out
    assert main(["libvirt", str(cfg)]) == 0
    assert "cleartext" not in capsys.readouterr().out  # ccidbridge's own, never for libvirt
