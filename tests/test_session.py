"""The bridge session against QEMU 7.2's twin: one test per rule (R1..R9 in
ccidbridge/protocol/session.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ccidbridge.protocol import events
from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.errors import TruncatedStream
from ccidbridge.protocol.messages import (
    Apdu,
    Atr,
    CardRemove,
    Error,
    Init,
    ReaderAdd,
    ReaderRemove,
    decode,
    encode,
)
from ccidbridge.protocol.session import BridgeSession, State
from lab.twin import Outcome, QemuDevice
from tests.sessionlink import Link, echo_card

ATR = bytes.fromhex("3b8f8001804f0ca0000003060300030000000068")
T1_ONLY = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")
SELECT = bytes.fromhex("00a4040007a0000000030000")


def ready_link(**kw) -> Link:
    link = Link(**kw)
    link.session.handle(events.CardInserted(ATR))
    link.connect()
    return link


def sent_types(link: Link) -> list[str]:
    return [type(m).__name__ for m in link.to_qemu]


# R1 -------------------------------------------------------------------------


def test_init_is_the_first_frame_on_every_connection() -> None:
    link = ready_link()
    assert isinstance(link.to_qemu[0], Init)
    link.disconnect()
    link.to_qemu.clear()
    link.connect()
    assert isinstance(link.to_qemu[0], Init)
    assert link.session.state is State.READY


def test_unsolicited_and_repeated_init_are_tolerated() -> None:
    link = Link(device=QemuDevice(wait_on=True))
    link.session.handle(events.CardInserted(ATR))
    link.connect()
    assert len(link.of(events.PeerInit)) == 2  # the unsolicited one and the reply
    link.session.receive_data(encode(Init(reader_id=0xFFFFFFFF)))  # and another, later
    link.pump()
    assert len(link.of(events.PeerInit)) == 3
    assert not link.of(events.PeerProtocolError)
    assert link.session.state is State.READY and link.device.card_present


# R2 -------------------------------------------------------------------------


def test_handshake_order_and_sync() -> None:
    link = ready_link()
    assert sent_types(link) == ["Init", "ReaderRemove", "ReaderAdd", "Atr"]
    assert link.to_qemu[2] == ReaderAdd(b"Test Reader", 0xFFFFFFFF)
    assert link.of(events.Synchronized) == [events.Synchronized(True)]
    assert link.device.atr == ATR and link.device.card_present


def test_handshake_without_card_sends_no_atr() -> None:
    link = Link()
    link.connect()
    assert sent_types(link) == ["Init", "ReaderRemove", "ReaderAdd"]
    assert link.of(events.Synchronized) == [events.Synchronized(False)]
    assert not link.device.card_present


def test_reconnect_drops_requests_of_the_old_connection() -> None:
    link = ready_link(hold_card=True)
    stale = link.guest(SELECT)  # forwarded, bridge holds it at the card
    link.disconnect()
    # The guest keeps going while the bridge is away: forwarded into the void.
    lost = link.device.guest_transmit(b"\x00\x84\x00\x00\x08")
    link.answer_held()  # the card answers the stale request after the close
    assert link.of(events.LateResponseDropped)
    link.hold_card = False
    link.connect()
    assert link.device.answer_for(stale).outcome is Outcome.LOST
    assert link.device.answer_for(lost).outcome is Outcome.LOST
    fresh = link.guest(SELECT)
    assert link.device.answer_for(fresh).data == echo_card(SELECT)


# R3 -------------------------------------------------------------------------


def test_one_control_message_in_flight() -> None:
    session = BridgeSession("r", reinsert_pause=0)
    session.handle(events.CardInserted(ATR))
    session.handle(events.ConnectionOpened())
    out = FrameDecoder().feed(session.data_to_send())
    assert [type(decode(f)).__name__ for f in out] == ["Init", "ReaderRemove"]
    for expected in ("ReaderAdd", "Atr"):
        session.receive_data(encode(Error(0)))
        out = FrameDecoder().feed(session.data_to_send())
        assert [type(decode(f)).__name__ for f in out] == [expected]
    session.receive_data(encode(Error(0)))
    assert session.data_to_send() == b""
    assert session.state is State.READY


def test_rapid_card_events_coalesce() -> None:
    session = BridgeSession("r")
    session.handle(events.ConnectionOpened())
    session.data_to_send()
    for _ in range(10):
        session.handle(events.CardInserted(ATR))
        session.handle(events.CardRemoved())
    session.handle(events.CardInserted(ATR))
    link = Link(session=session)
    link.device.connect()
    # Replay the acks QEMU would send for the two messages already out.
    link.device.receive_data(encode(Init()) + encode(ReaderRemove()))
    link.pump()
    assert sent_types(link) == ["ReaderAdd", "Atr"]
    assert link.device.card_present


# R4 + R5: property over random event sequences ------------------------------------


ops = st.lists(
    st.one_of(
        st.tuples(st.just("guest"), st.binary(min_size=4, max_size=40)),
        st.tuples(st.just("answer"), st.none()),
        st.tuples(st.just("fail"), st.none()),
        st.tuples(st.just("insert"), st.none()),
        st.tuples(st.just("remove"), st.none()),
        st.tuples(st.just("reconnect"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_every_guest_apdu_answered_once_in_order_with_its_own_answer(steps) -> None:
    link = ready_link(hold_card=True)
    sent: dict[int, bytes] = {}
    for op, arg in steps:
        if op == "guest":
            seq = link.device.guest_transmit(arg)
            sent[seq] = arg
            link.pump()
        elif op == "answer" and link.held:
            ev = link.held.pop(0)
            link.handle(events.ApduResponse(ev.seq, echo_card(ev.apdu)))
        elif op == "fail" and link.held:
            ev = link.held.pop(0)
            link.handle(events.ApduFailed(ev.seq, "test"))
        elif op == "insert":
            link.handle(events.CardInserted(ATR))
        elif op == "remove":
            link.handle(events.CardRemoved())
        elif op == "reconnect":
            link.disconnect()
            link.connect()
    link.answer_held()
    if not link.device.connected:
        link.connect()
    answered = {a.seq: a for a in link.device.answers}
    assert len(answered) == len(link.device.answers), "a request was answered twice"
    assert link.device.pending == 0, "a guest request was left unanswered"
    for seq, apdu in sent.items():
        answer = answered[seq]
        assert answer.outcome is not Outcome.DROPPED
        if answer.outcome is Outcome.RESPONSE:
            assert answer.data == echo_card(apdu), "answer matched to the wrong request"
    assert not link.device.wedged


# R6 ---------------------------------------------------------------------------


def test_card_gone_mid_apdu_fails_it_then_removes() -> None:
    link = ready_link(hold_card=True)
    seq = link.guest(SELECT)
    link.to_qemu.clear()
    link.handle(events.CardRemoved())
    assert sent_types(link) == ["Error", "CardRemove"]
    assert link.device.answer_for(seq).outcome is Outcome.FAILED
    link.answer_held()  # the card's answer comes too late
    assert link.of(events.LateResponseDropped)
    assert not link.device.card_present


def test_apdu_that_crosses_an_atr_is_dropped_not_answered() -> None:
    session = BridgeSession("r", reinsert_pause=0)
    session.handle(events.CardInserted(ATR))
    link = Link(session=session)
    link.connect()
    # Card reset: the ATR goes out; before QEMU's ack arrives, an APDU arrives.
    session.handle(events.CardInserted(ATR))
    assert isinstance(decode(FrameDecoder().feed(session.data_to_send())[0]), Atr)
    session.receive_data(encode(Apdu(SELECT)))
    session.receive_data(encode(Error(0)))
    evs = list(session.events())
    assert events.StaleApduDropped(SELECT) in evs
    assert not any(isinstance(e, events.TransmitApdu) for e in evs)
    assert session.data_to_send() == b""


def test_apdu_with_no_card_announced_is_failed_at_once() -> None:
    link = Link()
    link.connect()
    link.session.receive_data(encode(Apdu(SELECT)))
    assert decode(FrameDecoder().feed(link.session.data_to_send())[0]) == Error(1)


# R7 ---------------------------------------------------------------------------


def long_card(apdu: bytes) -> bytes:
    """INS 10 with an extended Le answers Le bytes; anything else: 9000."""
    n = int.from_bytes(apdu[5:7], "big") if apdu[1] == 0x10 else 0
    return bytes(i & 0xFF for i in range(n)) + b"\x90\x00"


def test_long_response_is_chained_and_never_dropped() -> None:
    link = ready_link(card=long_card)
    seq = link.guest(b"\x80\x10\x00\x00\x00\x03\xe8")  # extended Le = 1000
    first = link.device.answer_for(seq)
    assert first.outcome is Outcome.RESPONSE
    assert len(first.data) == 258 and first.data[-2:] == b"\x61\x00"
    data = first.data[:-2]
    sw = first.data[-2:]
    while sw[0] == 0x61:
        s = link.guest(b"\x00\xc0\x00\x00" + bytes([sw[1]]))
        answer = link.device.answer_for(s)
        assert answer.outcome is Outcome.RESPONSE and len(answer.data) <= 374
        data += answer.data[:-2]
        sw = answer.data[-2:]
    assert data + sw == long_card(b"\x80\x10\x00\x00\x00\x03\xe8")
    assert link.of(events.ResponseChained) and len(link.of(events.ApduAnsweredLocally)) == 3


def test_get_response_waits_behind_older_pending_answers() -> None:
    """R5: a GET RESPONSE served from the buffer must not overtake the answer to
    a command the guest sent earlier (QEMU matches answers first in, first out)."""
    link = ready_link(card=long_card, hold_card=True)
    first = link.guest(b"\x80\x10\x00\x00\x00\x01\x90")  # 400 bytes: chained
    second = link.guest(SELECT)  # pipelined behind it, still at the card
    held = link.held
    link.held = []
    link.handle(events.ApduResponse(held[0].seq, long_card(held[0].apdu)))
    assert link.device.answer_for(first).data[-2:] == b"\x61\x90"  # 144 more
    third = link.guest(b"\x00\xc0\x00\x00\x00")  # GET RESPONSE for the rest
    assert link.device.answer_for(second) is None and link.device.answer_for(third) is None
    link.handle(events.ApduResponse(held[1].seq, b"\x90\x00"))
    assert link.device.answer_for(second).data == b"\x90\x00"
    rest = link.device.answer_for(third).data
    assert rest == long_card(b"\x80\x10\x00\x00\x00\x01\x90")[256:]


def test_other_command_drops_the_chain() -> None:
    link = ready_link(card=long_card)
    link.guest(b"\x80\x10\x00\x00\x00\x01\x90")
    seq = link.guest(SELECT)
    assert link.device.answer_for(seq).data == b"\x90\x00"


def test_chaining_off_fails_long_responses_cleanly() -> None:
    link = ready_link(session=BridgeSession("r", chain_long_responses=False), card=long_card)
    link.session.handle(events.CardInserted(ATR))
    link.pump()
    seq = link.guest(b"\x80\x10\x00\x00\x00\x01\x77")  # 375 bytes with SW
    assert link.device.answer_for(seq).outcome is Outcome.FAILED


def test_exactly_374_passes_unchanged() -> None:
    link = ready_link(card=long_card)
    seq = link.guest(b"\x80\x10\x00\x00\x00\x01\x74")  # 372 data + SW
    assert link.device.answer_for(seq).data == long_card(b"\x80\x10\x00\x00\x00\x01\x74")


def test_response_without_status_word_is_a_failure() -> None:
    link = ready_link(card=lambda apdu: b"\x90")
    seq = link.guest(SELECT)
    assert link.device.answer_for(seq).outcome is Outcome.FAILED


# R8 ---------------------------------------------------------------------------


def test_qemu_refusing_an_atr_says_why() -> None:
    link = Link()
    link.session.handle(events.CardInserted(bytes.fromhex("3B8010F0")))
    link.connect()
    (refused,) = link.of(events.AtrRefused)
    assert "inconsistent" in refused.reason
    assert not link.device.card_present
    link.handle(events.CardInserted(b"\x3b\x0f" + bytes(39)))
    assert "40" in link.of(events.AtrRefused)[1].reason


def test_t1_only_atr_is_rewritten_for_the_t0_reader() -> None:
    link = Link()
    link.session.handle(events.CardInserted(T1_ONLY))
    link.connect()
    (rewritten,) = link.of(events.AtrRewritten)
    # TD1 81 -> 80 (T=0), the extended Lc/Le bit C0 -> 80 (P1), TCK recomputed.
    assert rewritten.sent == bytes.fromhex("3BFD1300008031FE158073C0218057597562694B657901")
    assert link.device.atr == rewritten.sent


def test_atr_rewrite_can_be_switched_off() -> None:
    link = Link(session=BridgeSession("r", rewrite_atr=False))
    link.session.handle(events.CardInserted(T1_ONLY))
    link.connect()
    assert not link.of(events.AtrRewritten) and link.device.atr == T1_ONLY


# R10 --------------------------------------------------------------------------


def frames_of(session: BridgeSession) -> list[str]:
    return [type(decode(f)).__name__ for f in FrameDecoder().feed(session.data_to_send())]


def ack_all(session: BridgeSession) -> list[str]:
    sent = []
    for _ in range(10):
        session.receive_data(encode(Error(0)))
        out = frames_of(session)
        if not out:
            break
        sent += out
    return sent


def test_resync_holds_the_atr_until_released() -> None:
    session = BridgeSession("r", reinsert_pause=0.25)
    session.handle(events.CardInserted(ATR))
    session.handle(events.ConnectionOpened())
    assert frames_of(session) == ["Init", "ReaderRemove"]
    assert ack_all(session) == ["ReaderAdd"]
    (hold,) = [e for e in session.events() if isinstance(e, events.HoldAtr)]
    assert hold.seconds == 0.25
    session.handle(events.ReleaseAtr(hold.token + 1))  # not ours: ignored
    assert frames_of(session) == []
    session.handle(events.ReleaseAtr(hold.token))
    assert frames_of(session) == ["Atr"]


def test_card_reset_is_shown_to_the_guest_as_removal_then_insertion() -> None:
    session = BridgeSession("r", reinsert_pause=0.25)
    session.handle(events.CardInserted(ATR))
    session.handle(events.ConnectionOpened())
    session.data_to_send()
    ack_all(session)
    token = next(e for e in session.events() if isinstance(e, events.HoldAtr)).token
    session.handle(events.ReleaseAtr(token))
    assert frames_of(session) == ["Atr"]
    ack_all(session)
    session.handle(events.CardInserted(ATR))  # reset by another host program
    assert frames_of(session) == ["CardRemove"]
    assert ack_all(session) == []
    hold = next(e for e in session.events() if isinstance(e, events.HoldAtr))
    session.handle(events.ReleaseAtr(hold.token))
    assert frames_of(session) == ["Atr"]


def test_card_removed_during_the_hold_is_not_announced() -> None:
    session = BridgeSession("r", reinsert_pause=0.25)
    session.handle(events.CardInserted(ATR))
    session.handle(events.ConnectionOpened())
    session.data_to_send()
    ack_all(session)
    hold = next(e for e in session.events() if isinstance(e, events.HoldAtr))
    session.handle(events.CardRemoved())
    session.handle(events.ReleaseAtr(hold.token))
    assert frames_of(session) == []


def test_guest_apdus_during_the_hold_fail_at_once() -> None:
    link = Link(session=BridgeSession("r", reinsert_pause=0.25), auto_release=False)
    link.session.handle(events.CardInserted(ATR))
    link.device.connect()
    link.device.receive_data(encode(Atr(ATR)))  # QEMU still shows an old card
    link.device.data_to_send()
    link.session.handle(events.ConnectionOpened())
    link.pump()
    assert not link.device.card_present  # the resync removed it; the ATR is held
    link.session.receive_data(encode(Apdu(SELECT)))  # a late forward: failed at once
    assert frames_of(link.session) == ["Error"]
    link.handle(events.ReleaseAtr(link.holds[-1].token))
    assert link.device.card_present


# R9 ---------------------------------------------------------------------------


def test_garbage_is_a_protocol_error_and_the_next_connection_works() -> None:
    link = ready_link()
    link.session.receive_data(b"\x00\x00\x00\x63\x00\x00\x00\x00\x00\x00\x00\x00")
    (err,) = link.of(events.PeerProtocolError) or [
        e for e in link.session.events() if isinstance(e, events.PeerProtocolError)
    ]
    assert "0x63" in str(err.error)
    link.disconnect()
    link.connect()
    seq = link.guest(SELECT)
    assert link.device.answer_for(seq).data == echo_card(SELECT)


def test_peer_that_dies_mid_frame_is_reported() -> None:
    session = BridgeSession("r")
    session.handle(events.ConnectionOpened())
    session.receive_data(encode(Init())[:7])
    session.handle(events.ConnectionClosed())
    (err,) = [e for e in session.events() if isinstance(e, events.PeerProtocolError)]
    assert isinstance(err.error, TruncatedStream) and err.error.buffered == 7


def test_wrong_direction_message_is_a_protocol_error() -> None:
    session = BridgeSession("r")
    session.handle(events.ConnectionOpened())
    session.receive_data(encode(CardRemove()))
    assert any(isinstance(e, events.PeerProtocolError) for e in session.events())


# Shutdown and Flush ----------------------------------------------------------------


def test_shutdown_fails_pending_removes_card_and_reader() -> None:
    link = ready_link(hold_card=True)
    seq = link.guest(SELECT)
    link.to_qemu.clear()
    link.handle(events.Shutdown())
    assert sent_types(link) == ["Error", "CardRemove", "ReaderRemove"]
    assert link.device.answer_for(seq).outcome is Outcome.FAILED
    assert link.of(events.ShutdownComplete) and link.session.state is State.CLOSED
    assert not link.device.card_present


def test_shutdown_while_disconnected_completes_at_once() -> None:
    session = BridgeSession("r")
    session.handle(events.Shutdown())
    assert list(session.events()) == [events.ShutdownComplete()]


def test_flush_waits_for_pending_answers() -> None:
    link = ready_link(hold_card=True)
    link.guest(SELECT)
    link.session.receive_data(bytes.fromhex("000000080000000000000000"))
    assert link.session.data_to_send() == b""
    link.answer_held()
    assert type(link.to_qemu[-1]).__name__ == "FlushComplete"


def test_device_twin_replays_the_observed_vectors() -> None:
    from tests import vectors

    for v in vectors.load("vscard"):
        if v.direction != "C->Q":
            continue
        device = QemuDevice()
        device.connect()
        device.receive_data(v.frame)
        assert device.data_to_send() == (v.reply or b""), v.name
    device = QemuDevice()
    device.connect()
    device.receive_data(bytes.fromhex("000000070000000000100000") + bytes(70_000))
    assert device.wedged


def test_twin_wedges_on_a_partial_frame_left_by_a_dead_connection() -> None:
    device = QemuDevice()
    device.connect()
    device.receive_data(encode(Init())[:6])
    device.disconnect()
    device.connect()
    device.receive_data(encode(Init()) * 2)
    assert device.data_to_send() == b""


def test_twin_wedges_on_long_pipelined_bursts_as_observed() -> None:
    frame100 = encode(Apdu(bytes(88)))
    assert len(frame100) == 100
    for count, wedges in ((700, True), (300, False)):
        device = QemuDevice()
        device.connect()
        device.receive_data(frame100 * count)
        assert device.wedged is wedges
    device = QemuDevice()
    device.connect()
    device.receive_data(encode(Apdu(bytes(116))) * 700)  # 128-byte frames
    assert not device.wedged
