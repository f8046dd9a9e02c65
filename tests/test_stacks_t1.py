"""Session rule R11: a guest that negotiated T=1 (a usb-ccid with x-t1-support on, in
QEMU's development tree only) sends T=1 blocks; the bridge refuses them instead of
garbling the card.  Against the QEMU twin's ``t1_reader``: no QEMU release offers T=1,
so this is untested against a real QEMU (docs/libvirt-facts.md#L33).
"""

from __future__ import annotations

import pytest

from ccidbridge.protocol import events
from ccidbridge.protocol.t1 import refusal, t1_block
from lab.twin import Outcome, QemuDevice
from lab.vpcd_card import ATR_PRESETS
from tests.sessionlink import Link, echo_card

SELECT = bytes.fromhex("00A4040C07A0000000030000")
VERIFY = bytes.fromhex("0020008108313233343536FFFF")


def _lrc(data: bytes) -> bytes:
    out = 0
    for b in data:
        out ^= b
    return bytes([out])


def _block(nad: int, pcb: int, inf: bytes) -> bytes:
    head = bytes([nad, pcb, len(inf)]) + inf
    return head + _lrc(head)


@pytest.mark.parametrize(("payload", "kind"), [
    (bytes.fromhex("00C101FE3E"), "S"),  # libccid's first block: IFS request 254
    (bytes.fromhex("00E101FE1E"), "S"),  # IFS response
    (bytes.fromhex("00C30101C3"), "S"),  # WTX request
    (_block(0, 0x00, SELECT), "I"),
    (_block(0, 0x40, VERIFY), "I"),  # N(S)=1, a PIN inside: refused, never logged
    (_block(0, 0x20, SELECT), "I"),  # chaining bit
    (bytes.fromhex("00810081"), "R"),
    (bytes.fromhex("00920092"), "R"),
])
def test_t1_blocks_are_recognised(payload: bytes, kind: str) -> None:
    block = t1_block(payload)
    assert block is not None and block.kind == kind
    why = refusal(payload)
    assert why is not None and "T=1" in why and "x-t1-support=off" in why
    assert payload.hex() not in why.lower() and "31323334" not in why


@pytest.mark.parametrize("apdu", [
    SELECT, VERIFY,
    bytes.fromhex("00A4020C020101"),  # SELECT FILE
    bytes.fromhex("00B0000010"),  # READ BINARY
    bytes.fromhex("0084000008"),  # GET CHALLENGE
    bytes.fromhex("00C0000000"),  # GET RESPONSE
    bytes.fromhex("00C00000E8"),
    bytes.fromhex("80100000020102"),
    bytes.fromhex("00200081"),  # VERIFY, retry counter query
    bytes.fromhex("00CA006E00"),  # GET DATA (OpenPGP)
    bytes.fromhex("00A40400"),
    bytes.fromhex("0022C1A403830101"),  # MSE SET, INS 22
    bytes.fromhex("002A9E9A0401020304"),  # PSO: COMPUTE DIGITAL SIGNATURE
    bytes(300),
    b"",
    b"\x00",
])
def test_real_apdus_are_not_t1_blocks(apdu: bytes) -> None:
    assert t1_block(apdu) is None
    assert refusal(apdu) is None


@pytest.mark.parametrize("mangle", ["lrc", "len", "nad", "pcb"])
def test_a_block_with_any_field_wrong_is_not_taken_for_one(mangle: str) -> None:
    good = bytearray(_block(0, 0x00, SELECT))
    if mangle == "lrc":
        good[-1] ^= 0x01
    elif mangle == "len":
        good[2] += 1
        good[-1] ^= 0x01 ^ 0x00  # LEN changed: the LRC no longer matches either
    elif mangle == "nad":
        good[0] = 0x88
        good[-1] ^= 0x88
    else:
        good[1] = 0x1F  # I-block with reserved bits set
        good[-1] ^= 0x1F
    assert t1_block(bytes(good)) is None


def _link(t1_reader: bool, atr: bytes) -> tuple[Link, list[bytes]]:
    seen: list[bytes] = []

    def card(apdu: bytes) -> bytes:
        seen.append(apdu)
        return echo_card(apdu)

    link = Link(device=QemuDevice(t1_reader=t1_reader), card=card)
    link.connect()
    link.handle(events.CardInserted(atr))
    return link, seen


def test_a_t1_guest_is_refused_and_the_card_sees_nothing() -> None:
    """The dual ATR (T=0 and T=1) is passed unchanged; with a T=1-capable usb-ccid the
    guest negotiates T=1 and every block it sends fails at once."""
    link, seen = _link(True, ATR_PRESETS["dual"])
    assert link.device.atr == ATR_PRESETS["dual"] and link.device.guest_protocol == 1
    seqs = link.device.guest_command(SELECT) + link.device.guest_command(VERIFY)
    link.pump()
    assert len(seqs) == 3  # S(IFS request), then two I-blocks
    assert [link.device.answer_for(s).outcome for s in seqs] == [Outcome.FAILED] * 3
    assert seen == []  # nothing reached the card
    refused = link.of(events.ApduRefused)
    assert len(refused) == 3 and all("T=1" in r.reason for r in refused)
    assert "S-block (IFS request, PCB C1)" in refused[0].reason
    assert "I-block (PCB 40" in refused[2].reason
    assert link.device.pending == 0  # R5: every request answered


def test_the_same_card_on_a_t0_reader_is_relayed() -> None:
    """The control: QEMU as released (T=0 only) — the guest sends APDUs, the card answers."""
    link, seen = _link(False, ATR_PRESETS["dual"])
    assert link.device.guest_protocol == 0
    [seq] = link.device.guest_command(SELECT)
    link.pump()
    assert link.device.answer_for(seq).outcome is Outcome.RESPONSE
    assert link.device.answer_for(seq).data == echo_card(SELECT)
    assert seen == [SELECT] and not link.of(events.ApduRefused)


def test_the_t0_rewrite_does_not_keep_a_t1_reader_on_t0() -> None:
    """R8's rewrite names T=0 in TD1 but keeps TD2's T=1 (atr.announce_t0), so a
    T=1-capable usb-ccid still lets the guest negotiate T=1: the refusal is what protects
    the card, and x-t1-support=off (the generated config) what keeps it usable."""
    link, seen = _link(True, ATR_PRESETS["t1"])
    assert link.device.atr != ATR_PRESETS["t1"] and link.device.guest_protocol == 1
    seqs = link.device.guest_command(SELECT)
    link.pump()
    assert [link.device.answer_for(s).outcome for s in seqs] == [Outcome.FAILED] * 2
    assert seen == []


def test_the_bridge_logs_the_refusal_in_one_clear_line(tmp_path) -> None:  # noqa: ANN001
    """Through the runtime over a socket: the T=1 block fails in the guest, the card is not
    asked, and the log says why in one line without the block's bytes."""
    from lab.device_peer import DevicePeer
    from lab.instant_card import InstantCard
    from tests.bridgeharness import RunningBridge, served_card

    asked: list[bytes] = []

    def respond(apdu: bytes) -> bytes:
        asked.append(apdu)
        return b"\x90\x00"

    ifs = bytes.fromhex("00C101FE3E")
    with DevicePeer("unix", path=str(tmp_path / "q.sock")) as peer, RunningBridge(
            served_card(peer.endpoint), InstantCard(respond=respond)) as bridge:
        peer.wait_card(True)
        assert peer.guest(ifs).outcome is Outcome.FAILED
        line = bridge.wait_log("T=1 S-block (IFS request, PCB C1)")
        assert peer.guest(SELECT).outcome is Outcome.RESPONSE  # APDUs still pass
    assert asked == [SELECT]
    assert "x-t1-support=off" in line and "00c101fe3e" not in line.lower()
    assert len(line.splitlines()) == 1
