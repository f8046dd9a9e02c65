"""The PIN-retry guard, the APDU policy and the trace on real components:
pcscd + vpcd with the project's cards (lab/vpcd_card.py: one PIN, "1234", 3
tries; lab/cards/openpgp.py: PW1, PW3, DO C4), the bridge in front, the QEMU
twin playing QEMU.  Every refusal is shown to never reach the card: the
card's own counters (tries left, APDUs seen) do not move."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from ccidbridge.card.pcsc import PcscCard
from ccidbridge.config import loads
from ccidbridge.spec import ReaderSpec, ServedCard
from lab.cards import openpgp
from lab.device_peer import DevicePeer
from tests.bridgeharness import RunningBridge
from tests.test_pin_redaction import PIN, leaks, pin_commands

pytestmark = pytest.mark.stack

WRONG = bytes.fromhex("0020000004") + b"0000"
RIGHT = bytes.fromhex("0020000004") + b"1234"
QUERY = bytes.fromhex("00200000")
COUNT = bytes.fromhex("8014000004")  # lab.vpcd_card: APDUs since power-on, this one included
TEST_AID = bytes.fromhex("F0636369646272")
PIV_AID = bytes.fromhex("A000000308000010000100")


def card_xml(socket_path: Path | str, reader: str, inner: str = "") -> str:
    return ("<ccidbridge>\n  <smartcard mode='passthrough' type='unix'>\n"
            f"    <source mode='bind' path={quoteattr(str(socket_path))}/>\n"
            f"    <reader name={quoteattr(reader)}/>\n{inner}\n  </smartcard>\n</ccidbridge>\n")


def served(peer: DevicePeer, reader: str, inner: str = "") -> ServedCard:
    """The ServedCard ``ccidbridge run`` would make of a config with ``inner``."""
    (card,) = loads(card_xml("/run/unused.sock", reader, inner), "vm.xml").served_cards()
    return ServedCard(label="t", endpoint=peer.endpoint, reader=ReaderSpec(name=reader),
                      pin_guard=card.pin_guard, policy=card.policy)


def bridge(peer: DevicePeer, reader: str, inner: str = "") -> RunningBridge:
    spec = ReaderSpec(name=reader)
    return RunningBridge(served(peer, reader, inner), PcscCard(spec))


def select(aid: bytes) -> bytes:
    return bytes([0x00, 0xA4, 0x04, 0x0C, len(aid)]) + aid


def sw(answer: object) -> str:
    return answer.data[-2:].hex().upper()  # type: ignore[attr-defined]


# -- the PIN guard --------------------------------------------------------------------


def test_default_guard_keeps_the_last_try_and_the_card_never_sees_the_refusal(
    test_card, tmp_path
) -> None:
    card = test_card("dual", process=False)
    logic = card.logic
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge(peer, card.reader) as b,
    ):
        peer.wait_card(True)
        assert sw(peer.guest(WRONG)) == "63C2"
        assert sw(peer.guest(WRONG)) == "63C1"
        seen = logic.apdu_count
        for apdu in (WRONG, RIGHT, bytes([0x0C]) + WRONG[1:], bytes([0x00, 0x21]) + WRONG[2:]):
            assert sw(peer.guest(apdu)) == "6983"  # refused: the PIN is blocked for the guest
        assert (logic.tries_left, logic.apdu_count) == (1, seen)  # the card saw none of them
        assert sw(peer.guest(QUERY)) == "63C1"  # the question is still asked of the card
        assert logic.apdu_count == seen + 1
        b.wait_log("refused by the pin-guard: reference 00 has 1 try left")
        assert not leaks(b.text())
        # On the host (a user who knows the PIN): the counter is full again.  The
        # guard learns it from the card's own answer and lets the guest in.
        logic.tries_left = 3
        assert sw(peer.guest(QUERY)) == "63C3"
        assert sw(peer.guest(RIGHT)) == "9000"
        assert logic.verified


def test_keep_0_switches_the_guard_off(test_card, tmp_path) -> None:
    card = test_card("dual", process=False)
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge(peer, card.reader, "<pin-guard keep='0'/>"),
    ):
        peer.wait_card(True)
        assert [sw(peer.guest(WRONG)) for _ in range(4)] == ["63C2", "63C1", "63C0", "6983"]
    assert card.logic.tries_left == 0


def test_keep_2_refuses_earlier(test_card, tmp_path) -> None:
    card = test_card("dual", process=False)
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge(peer, card.reader, "<pin-guard keep='2'/>"),
    ):
        peer.wait_card(True)
        assert sw(peer.guest(QUERY)) == "63C3"
        assert sw(peer.guest(WRONG)) == "63C2"
        assert sw(peer.guest(WRONG)) == "6983"
    assert card.logic.tries_left == 2


def test_openpgp_pw1_learned_from_do_c4_and_6e_and_pw3_apart(own_card, card_keys, tmp_path) -> None:
    card = own_card(openpgp.spec(card_keys), process=False)
    logic = card.logic
    assert isinstance(logic, openpgp.OpenPgpCard)
    logic.pw1.tries = 1  # spent elsewhere (on the host, before this guest)
    pw1_81 = bytes.fromhex("0020008106") + b"000000"
    pw1_82 = bytes.fromhex("0020008206") + openpgp.PW1
    pw3 = bytes.fromhex("0020008308") + b"00000000"
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge(peer, card.reader),
    ):
        peer.wait_card(True)
        assert sw(peer.guest(select(openpgp.AID_PREFIX))) == "9000"
        status = peer.guest(bytes.fromhex("00CA00C400"))  # PW status bytes
        assert status.data[4] == 1
        for apdu in (pw1_81, pw1_82):  # the right PIN too: the guard cannot know it is
            assert sw(peer.guest(apdu)) == "6983"
        assert logic.pw1.tries == 1 and not logic.verified
        assert sw(peer.guest(pw3)) == "63C2"  # PW3 is another counter
        assert logic.pw3.tries == 2
        # 006E carries C4 too: the counter is back to 3 (reset on the host), the guard follows.
        logic.pw1.tries = 3
        assert peer.guest(bytes.fromhex("00CA006E00")).data[-2:] == b"\x90\x00"
        assert sw(peer.guest(pw1_82)) == "9000"
        assert 0x82 in logic.verified
        # Wrong twice through 81: 82 is the same PW1, so 82 is refused (G2).
        assert sw(peer.guest(pw1_81)) == "63C2"
        assert sw(peer.guest(pw1_81)) == "63C1"
        assert sw(peer.guest(pw1_82)) == "6983"
        assert logic.pw1.tries == 1


def test_a_reinserted_card_is_not_the_card_the_guard_knew(test_card, tmp_path) -> None:
    card = test_card("dual", process=False)
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge(peer, card.reader),
    ):
        peer.wait_card(True)
        peer.guest(WRONG)
        assert sw(peer.guest(WRONG)) == "63C1"
        assert sw(peer.guest(WRONG)) == "6983"
        card.remove()
        peer.wait_card(False, timeout=5)
        card.insert()  # a fresh card: 3 tries
        peer.wait_card(True, timeout=5)
        assert sw(peer.guest(WRONG)) == "63C2"
        assert card.logic.tries_left == 2


# -- the policy -----------------------------------------------------------------------

POLICY = f"""    <policy>
      <deny ins='E6 44'/>
      <deny aid='{TEST_AID.hex().upper()}' cla='80/F0' ins='10'/>
    </policy>"""


def test_denied_commands_are_answered_6985_and_never_reach_the_card(test_card, tmp_path) -> None:
    card = test_card("dual", process=False)
    with (
        DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer,
        bridge(peer, card.reader, POLICY) as b,
    ):
        peer.wait_card(True)
        before = int.from_bytes(peer.guest(COUNT).data[:4], "big")
        for apdu in ("00E6000000", "00E6000000", "0044000000", "80E6000000"):
            assert sw(peer.guest(bytes.fromhex(apdu))) == "6985"
        assert int.from_bytes(peer.guest(COUNT).data[:4], "big") == before + 1
        echo = bytes.fromhex("8010000002ABCD")
        assert sw(peer.guest(echo)) == "6985"  # nothing selected: maybe the test applet (P3)
        assert sw(peer.guest(select(PIV_AID))) == "9000"
        assert peer.guest(echo).data == bytes.fromhex("ABCD9000")  # another applet: allowed
        assert sw(peer.guest(select(TEST_AID))) == "9000"
        assert sw(peer.guest(echo)) == "6985"
        assert sw(peer.guest(bytes.fromhex("8014000004"))) == "9000"  # other INS: allowed
        assert sw(peer.guest(select(bytes.fromhex("F000000001")))) == "6A82"  # failed (S2)
        assert sw(peer.guest(echo)) == "6985"
        count = int.from_bytes(peer.guest(COUNT).data[:4], "big")
    # COUNT, SELECT, ECHO, SELECT, COUNT, SELECT, COUNT: the denied ones never arrived
    assert count == before + 7
    warned = [ln for ln in b.capture.lines if ln.startswith("WARNING") and "policy" in ln]
    assert len(warned) == 2, warned  # once per rule
    assert "<deny ins='E6 44'/> (line 6)" in warned[0]


# -- the trace --------------------------------------------------------------------------


def _run(config: Path, trace: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ccidbridge", "run", *flags, "--trace", str(trace), str(config)],
        stderr=subprocess.PIPE, text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return err


@pytest.mark.parametrize("verbose", [[], ["-vv"]], ids=["trace", "trace-vv"])
def test_run_trace_is_0600_json_lines_and_never_shows_a_pin(
    test_card, tmp_path, verbose
) -> None:
    card = test_card("dual")
    sock = tmp_path / "q.sock"
    config = tmp_path / "vm.xml"
    config.write_text(card_xml(sock, card.reader, "    <policy><deny ins='E6'/></policy>"))
    trace = tmp_path / "trace.jsonl"
    trace.write_text("old\n")
    os.chmod(trace, 0o644)  # an existing file is truncated and made private
    with DevicePeer("unix", path=str(sock)) as peer:
        proc = _run(config, trace, *verbose)
        try:
            peer.wait_card(True, timeout=10)
            for apdu in pin_commands():
                peer.guest(apdu)
            peer.guest(bytes.fromhex("80100000023132"))  # non-PIN data
            peer.guest(bytes.fromhex("00E6000000"))  # refused by the policy
            err = _stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600
    text = trace.read_text()
    assert not leaks(text), leaks(text)
    assert PIN.hex() not in text.lower()
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert len(lines) == 2 * (len(pin_commands()) + 2)
    cmds, rsps = lines[0::2], lines[1::2]
    assert {c["dir"] for c in cmds} == {"command"} and {r["dir"] for r in rsps} == {"response"}
    assert all(c["card"] == rsps[0]["card"] and "vm.xml" in c["card"] for c in cmds)
    first = cmds[0]
    assert (first["cla"], first["ins"], first["p1"], first["p2"]) == ("00", "20", "00", "81")
    assert all("data" not in c for c in cmds[: len(pin_commands())])  # never PIN data
    assert all("data" not in r for r in rsps[: len(pin_commands())])
    assert all(r["us"] >= 0 and r["sw"] for r in rsps)
    echo, echo_rsp = cmds[-2], rsps[-2]
    assert echo_rsp["sw"] == "9000"
    if verbose:
        assert echo["data"] == "023132" and echo_rsp["data"] == "3132"
    else:
        assert "data" not in text
    assert rsps[-1]["sw"] == "6985" and rsps[-1]["by"] == "policy"
    assert not leaks(err)


def test_run_trace_stops_at_its_limit_and_says_so(test_card, tmp_path) -> None:
    card = test_card("dual")
    sock = tmp_path / "q.sock"
    config = tmp_path / "vm.xml"
    config.write_text(card_xml(sock, card.reader))
    trace = tmp_path / "trace.jsonl"
    with DevicePeer("unix", path=str(sock)) as peer:
        proc = _run(config, trace, "--trace-max-bytes", "2048")
        try:
            peer.wait_card(True, timeout=10)
            for _ in range(40):
                assert peer.guest(COUNT).data[-2:] == b"\x90\x00"  # served on after the stop
            err = _stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    data = trace.read_bytes()
    assert len(data) <= 2048
    lines = [json.loads(ln) for ln in data.decode().splitlines()]
    assert lines[-1]["trace"] == "stopped" and "--trace-max-bytes" in lines[-1]["reason"]
    assert all("dir" in ln for ln in lines[:-1])
    assert err.count("tracing stopped") == 1


def test_run_trace_refuses_a_symlink(test_card, tmp_path) -> None:
    card = test_card("dual")
    config = tmp_path / "vm.xml"
    config.write_text(card_xml(tmp_path / "q.sock", card.reader))
    target = tmp_path / "elsewhere"
    target.write_text("keep me\n")
    link = tmp_path / "trace.jsonl"
    link.symlink_to(target)
    done = subprocess.run([sys.executable, "-m", "ccidbridge", "run", "--trace", str(link),
                           str(config)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "cannot write the trace" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert target.read_text() == "keep me\n"
