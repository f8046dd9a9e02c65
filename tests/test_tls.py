"""TLS chardevs (ccidbridge/tls.py, T1-T3) against real QEMU's tls-creds-x509:
both directions, mutual authentication, and every refusal with one log line
while QEMU gets no VSCard byte; bad <tls> files are FILE:LINE config errors."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccidbridge.protocol.messages import Init, encode
from ccidbridge.runtime import bridge as bridge_module
from ccidbridge.runtime.transport import TransportError
from ccidbridge.spec import Endpoint, TlsSpec
from lab.instant_card import InstantCard
from lab.qemu import TcpEndpoint, free_tcp_port
from lab.tlscerts import Pki
from tests.bridgeharness import RunningBridge, served_card

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_endpoint(port: int, listens: bool, creds: Path, names: tuple[str, ...] = ()) -> Endpoint:
    return Endpoint("tcp", listens, host=HOST, port=port, tls=TlsSpec(str(creds), names))


@pytest.mark.qemu
def test_bridge_connects_to_qemu_over_tls(qemu_passthru, pki: Pki) -> None:
    qemu = qemu_passthru("tcp", debug=True, tls_dir=str(pki.creds(HOST, "server")))
    ep = tls_endpoint(qemu.endpoint.port, False, pki.creds("ccidbridge", "client"))
    with RunningBridge(served_card(ep), InstantCard()) as b:
        b.wait_synced(10)
        line = b.wait_log("whose certificate names")
        assert "TLSv1.3" in line or "TLSv1.2" in line
    assert "VSC_ATR" in qemu.stdout()  # QEMU's own debug line: it got the ATR over TLS


@pytest.mark.qemu
def test_qemu_connects_to_the_bridge_over_tls(qemu_passthru, pki: Pki) -> None:
    port = free_tcp_port()
    ep = tls_endpoint(port, True, pki.creds(HOST, "server"), names=("qemu-host",))
    with RunningBridge(served_card(ep), InstantCard()) as b:
        b.wait_log("listening on")
        qemu_passthru("tcp", server=False, endpoints=[TcpEndpoint(port)],
                      tls_dir=str(pki.creds("qemu-host", "client")))
        b.wait_synced(10)


@pytest.mark.qemu
@pytest.mark.parametrize("case", ["other CA", "wrong name", "not in peer-names"])
def test_a_refused_qemu_gets_nothing(qemu_passthru, pki: Pki, tmp_path, case: str) -> None:
    if case == "other CA":
        server = Pki(tmp_path / "other", name="another CA").creds(HOST, "server")
    elif case == "wrong name":
        server = pki.creds("somewhere.else", "server")
    else:
        server = pki.creds(HOST, "server", subdir="server-ok")
    qemu = qemu_passthru("tcp", debug=True, tls_dir=str(server))
    names = ("only-this-one",) if case == "not in peer-names" else ()
    ep = tls_endpoint(qemu.endpoint.port, False, pki.creds("ccidbridge", "client"), names)
    with RunningBridge(served_card(ep), InstantCard()) as b:
        line = b.wait_log("refused the TLS peer", timeout=10)
        time.sleep(0.6)  # two more reconnect rounds: still one line
        lines = [x for x in b.text().splitlines() if "refused the TLS peer" in x]
        assert lines == [line], lines
        assert not b.bridge.synchronized.is_set()
    expect = {
        "other CA": "unable to get local issuer certificate",
        "wrong name": "IP address mismatch",
        "not in peer-names": "not one of peer-names='only-this-one'",
    }[case]
    assert expect in line, line
    assert "VSC_" not in qemu.stdout()  # QEMU never got a VSCard message


def test_a_peer_that_stalls_in_the_handshake_costs_only_its_connection(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge_module, "TLS_HANDSHAKE_TIMEOUT", 0.5)
    port = free_tcp_port()
    ep = tls_endpoint(port, True, pki.creds(HOST, "server"))
    with RunningBridge(served_card(ep), InstantCard()) as b:
        b.wait_log("listening on")
        staller = socket.create_connection((HOST, port))  # says nothing at all
        staller.settimeout(5)
        assert staller.recv(4096) is not None  # the bridge's ServerHello... or nothing
        b.wait_log("stalled in the TLS handshake", timeout=5)
        staller.close()


def test_bad_tls_files_are_config_errors_at_their_line(pki: Pki, tmp_path) -> None:
    good = pki.creds("ccidbridge", "client")
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    other = pki.creds("someone-else", "client")
    for name in ("ca-cert.pem", "client-cert.pem"):
        (mismatched / name).write_bytes((good / name).read_bytes())
    (mismatched / "client-key.pem").write_bytes((other / "client-key.pem").read_bytes())
    no_ca = tmp_path / "no-ca"
    no_ca.mkdir()
    for name in ("client-cert.pem", "client-key.pem"):
        (no_ca / name).write_bytes((good / name).read_bytes())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        (garbage / name).write_text("not a certificate\n")
    cases = {
        mismatched: "client-key.pem does not belong to",
        no_ca: "ca-cert.pem is missing",
        garbage: "not a usable CA certificate",
    }
    for directory, expect in cases.items():
        config = tmp_path / f"{directory.name}.xml"
        config.write_text(
            "<ccidbridge>\n"
            "  <smartcard mode='passthrough' type='tcp'>\n"
            f"    <source mode='bind' host='{HOST}' service='5999' tls='yes'/>\n"
            f"    <tls dir='{directory}'/>\n"
            "  </smartcard>\n"
            "</ccidbridge>\n"
        )
        proc = subprocess.run([sys.executable, "-m", "ccidbridge", "check", str(config)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"{config}:4: <tls>: "), proc.stderr
        assert expect in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_tls_yes_without_certificates_is_not_served_and_says_why(tmp_path) -> None:
    config = tmp_path / "vm.xml"
    config.write_text(
        "<ccidbridge>\n"
        "  <smartcard mode='passthrough' type='tcp'>\n"
        f"    <source mode='bind' host='{HOST}' service='5999' tls='yes'/>\n"
        "  </smartcard>\n"
        "</ccidbridge>\n"
    )
    proc = subprocess.run([sys.executable, "-m", "ccidbridge", "check", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert "needs the bridge's own certificates" in proc.stdout + proc.stderr


def test_the_bridge_refuses_to_start_with_unusable_files(tmp_path) -> None:
    ep = tls_endpoint(free_tcp_port(), True, tmp_path / "nothing-here")
    with pytest.raises(TransportError, match="ca-cert.pem is missing"):
        RunningBridge(served_card(ep), InstantCard())


def test_libvirt_output_keeps_tls_yes_and_never_our_tls_element(pki: Pki, tmp_path) -> None:
    creds = pki.creds("ccidbridge", "client")
    config = tmp_path / "vm.xml"
    config.write_text(
        "<ccidbridge>\n"
        "  <smartcard mode='passthrough' type='tcp'>\n"
        f"    <source mode='bind' host='{HOST}' service='5999' tls='yes'/>\n"
        f"    <tls dir='{creds}'/>\n"
        "  </smartcard>\n"
        "</ccidbridge>\n"
    )
    out = subprocess.run([sys.executable, "-m", "ccidbridge", "libvirt", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "tls='yes'" in out.stdout and "<tls" not in out.stdout
    argv = subprocess.run([sys.executable, "-m", "ccidbridge", "qemu-argv", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert "tls-creds-x509" in argv.stdout and str(creds) not in argv.stdout


def test_a_peer_with_an_expired_certificate_is_refused(pki: Pki) -> None:
    """QEMU will not even start with an expired certificate of its own (docs/lab.md#V13),
    so the expired peer here is a plain TLS client with the same CA."""
    port = free_tcp_port()
    ep = tls_endpoint(port, True, pki.creds(HOST, "server"))
    old = pki.creds("qemu-host", "client", expired=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(old / "ca-cert.pem"))
    ctx.load_cert_chain(str(old / "client-cert.pem"), str(old / "client-key.pem"))
    with RunningBridge(served_card(ep), InstantCard()) as b:
        b.wait_log("listening on")
        raw = socket.create_connection((HOST, port), timeout=5)
        got = b""
        with (
            contextlib.suppress(ssl.SSLError, OSError),
            ctx.wrap_socket(raw, server_hostname=HOST) as tls_sock,
        ):
            got = tls_sock.recv(4096)  # TLS 1.3: the refusal comes after our handshake
        assert got == b""  # not one VSCard byte
        assert "certificate has expired" in b.wait_log("refused the TLS peer")


def test_a_peer_speaking_clear_text_to_a_tls_bridge_gets_no_vscard_byte(pki: Pki) -> None:
    port = free_tcp_port()
    ep = tls_endpoint(port, True, pki.creds(HOST, "server"))
    with RunningBridge(served_card(ep), InstantCard()) as b:
        b.wait_log("listening on")
        plain = socket.create_connection((HOST, port), timeout=5)
        plain.sendall(encode(Init()))  # what a VSCard peer says first
        line = b.wait_log("refused the TLS peer")
        try:
            got = plain.recv(4096)
        except ConnectionResetError:
            got = b""  # closed on it, with our Init unread
        plain.close()
        assert got == b"" or got[0] == 0x15  # nothing, or a TLS alert record
        assert "handshake failed: wrong version number" in line
