"""PIN data never reaches a log line, at any level, by any path.

Every PIN-carrying command form (VERIFY 20/21, CHANGE REFERENCE DATA 24/25,
RESET RETRY COUNTER 2C/2D; plain, secure-messaging and chained class bytes)
is sent through the bridge at -vv: answered by the card, racing a resync
fence, refused while no card is announced, and to a hung card.  Every log line
is then searched for the PIN as hex in any case and spacing, as ASCII, and as
``\\x`` escapes.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import pytest

from ccidbridge.card.pcsc import PcscCard
from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.messages import Error, decode, encode, frame
from ccidbridge.protocol.wire import MsgType
from ccidbridge.runtime import apdulog
from ccidbridge.spec import Endpoint, ReaderSpec
from lab.bridgeproc import write_config
from lab.device_peer import DevicePeer
from tests.bridgeharness import RunningBridge, served_card

PIN = b"739182"  # digits no other test data contains
PUK = b"46508213"
CLAS = (0x00, 0x0C, 0x10, 0x80)  # plain, secure messaging, chained, proprietary


def pin_commands() -> list[bytes]:
    out = []
    for cla in CLAS:
        out.append(bytes([cla, 0x20, 0x00, 0x81, len(PIN)]) + PIN)  # VERIFY
        tlv = b"\x80" + bytes([len(PIN)]) + PIN
        out.append(bytes([cla, 0x21, 0x00, 0x81, len(tlv)]) + tlv)  # VERIFY, BER-TLV data
        out.append(bytes([cla, 0x24, 0x00, 0x81, 2 * len(PIN)]) + PIN + PIN)  # CHANGE REF DATA
        out.append(bytes([cla, 0x25, 0x00, 0x81, len(tlv)]) + tlv)
        out.append(bytes([cla, 0x2C, 0x00, 0x81, len(PUK + PIN)]) + PUK + PIN)  # RESET RETRY
        out.append(bytes([cla, 0x2D, 0x00, 0x81, len(tlv)]) + tlv)
    return out


def leaks(text: str) -> list[str]:
    """Every log line that shows a PIN or PUK in any encoding."""
    found = []
    for secret in (PIN, PUK):
        h = secret.hex()
        patterns = [
            re.escape(secret.decode()),
            r"[\s:]?".join(h[i : i + 2] for i in range(0, len(h), 2)),  # 37 33 39 / 37:33:39
            "".join(f"\\\\x{b:02x}" for b in secret),  # \x37\x33...
        ]
        for line in text.splitlines():
            if any(re.search(p, line, re.IGNORECASE) for p in patterns):
                found.append(line)
    return found


def test_the_checker_finds_a_pin_in_every_encoding() -> None:
    """The control: leaks() must catch what it is there to catch."""
    for shown in (PIN.decode(), PIN.hex(), PIN.hex().upper(), PIN.hex(" "), repr(PIN), str(PIN)):
        assert leaks(f"INFO APDU [{shown}]"), shown
    assert not leaks("INFO APDU CLA 00 INS 20 P1 00 P2 81, 11 bytes [data redacted: PIN]")


def test_every_pin_form_is_secret_and_others_are_not() -> None:
    for apdu in pin_commands():
        assert apdulog.is_secret(apdu), apdu[:2].hex()
        assert not leaks(apdulog.describe_command(apdu, with_data=True))
        assert not leaks(apdulog.describe_response(PIN + b"\x90\x00", True, apdu))
    assert not apdulog.is_secret(bytes.fromhex("00A4040006") + PIN)
    assert PIN.hex() in apdulog.describe_command(bytes.fromhex("00A4040006") + PIN, True)


def _recv_frames(sock: socket.socket, decoder: FrameDecoder, want: int) -> list[object]:
    out: list[object] = []
    while len(out) < want:
        data = sock.recv(4096)
        if not data:
            break
        out += [decode(f) for f in decoder.feed(data)]
    return out


@pytest.mark.stack
def test_no_pin_in_the_bridge_log_at_debug_answered_fenced_refused_and_hung(
    test_card, tmp_path
) -> None:
    card = test_card("dual")
    path = str(tmp_path / "q.sock")
    spec = ReaderSpec(name=card.reader, apdu_timeout=0.5)
    commands = pin_commands()
    # 1. A raw peer playing QEMU, so the APDUs can race the resync fence (R6)
    #    and arrive while no card is announced (R10's pause).
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    server.settimeout(5)
    bridge = RunningBridge(served_card(Endpoint("unix", False, path=path), spec),
                           PcscCard(spec), trace=2)
    try:
        conn, _ = server.accept()
        conn.settimeout(5)
        dec = FrameDecoder()
        _recv_frames(conn, dec, 2)  # Init, ReaderRemove (in flight: the fence is up)
        for apdu in commands:  # settled by QEMU already: dropped, never answered
            conn.sendall(frame(MsgType.APDU, 0, apdu))
        conn.sendall(encode(Error(0)))  # ack ReaderRemove -> ReaderAdd
        _recv_frames(conn, dec, 1)
        conn.sendall(encode(Error(0)))  # ack ReaderAdd; the ATR waits 0.5 s (R10)
        for apdu in commands:  # no card announced yet: refused at once
            conn.sendall(frame(MsgType.APDU, 0, apdu))
        _recv_frames(conn, dec, len(commands))
        conn.close()
    finally:
        server.close()
        bridge.stop()
    # 2. A QEMU twin: the card answers every form, then hangs on one.
    with DevicePeer("unix", path=str(tmp_path / "twin.sock")) as peer:
        spec2 = ReaderSpec(name=card.reader, apdu_timeout=0.5)
        with RunningBridge(served_card(peer.endpoint, spec2), PcscCard(spec2), trace=2) as b2:
            peer.wait_card(True)
            for apdu in commands:
                peer.guest(apdu)
            card.sigstop()
            try:
                # A reference the PIN guard has no count for yet (after the forms above
                # it holds reference 81 at one try left and answers those itself).
                peer.guest(bytes([0x00, 0x20, 0x00, 0x82, len(PIN)]) + PIN, timeout=5)
                b2.wait_log("did not answer within")
            finally:
                card.sigcont()
            peer.wait_card(True, timeout=5)
            text2 = b2.text()
    text = bridge.text() + "\n" + text2
    assert "dropped: QEMU already settled it" in bridge.text()  # the fence was raced
    assert "no card is announced" in bridge.text()  # and the pause
    assert text2.count("data redacted: PIN") >= len(commands)  # every form was logged at -vv
    assert not leaks(text), leaks(text)


@pytest.mark.stack
def test_no_pin_in_the_output_of_ccidbridge_run_vv(test_card, tmp_path) -> None:
    card = test_card("dual")
    sock = tmp_path / "q.sock"
    config = write_config(tmp_path / "vm.xml", sock, card.reader)
    with DevicePeer("unix", path=str(sock)) as peer:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccidbridge", "run", "-vv", str(config)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            peer.wait_card(True, timeout=10)
            for apdu in pin_commands():
                peer.guest(apdu)
            peer.guest(bytes.fromhex("80100000023132"))  # the control: non-PIN data shown
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert "[3132]" in err
    assert err.count("data redacted: PIN") >= len(pin_commands())
    assert not leaks(err), leaks(err)
