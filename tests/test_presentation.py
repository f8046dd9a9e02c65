"""The presentation rules P1..P3 (ccidbridge/protocol/presentation.py) through
the session against QEMU 7.2's twin, and their pure parts with property tests:
bytes outside the named fields never change, and garbage passes unchanged."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from ccidbridge.protocol import events
from ccidbridge.protocol.atr import announce_t0, tck
from ccidbridge.protocol.presentation import RULES, Presentation
from ccidbridge.protocol.session import BridgeSession
from lab.twin import Outcome
from tests.sessionlink import Link

T1_ATR = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")
#: 5F52 as an OpenPGP 3.4 YubiKey-style card answers it: category 00, card
#: capabilities 73 C0 21 C0 (chaining + extended Lc/Le), status 05 90 00.
HIST = bytes.fromhex("0073C021C0059000")
HIST_CLEARED = bytes.fromhex("0073C02180059000")
EXT_INFO = bytes.fromhex("7F6608020208000202 0800".replace(" ", ""))
AID = bytes.fromhex("4F10D2760001240103040006123456780000")
DISCRETIONARY = bytes.fromhex("7308C00A7D000BFE080000FF")  # a short, odd 73 on purpose
OK = b"\x90\x00"
DUAL_ATR = bytes.fromhex("3B8F8001804F0CA0000003060300030000000068")


def template_6e(*children: bytes) -> bytes:
    body = b"".join(children)
    length = bytes([len(body)]) if len(body) < 0x80 else b"\x81" + bytes([len(body)])
    return b"\x6e" + length + body


APP_DATA = template_6e(AID, b"\x5f\x52\x08" + HIST, EXT_INFO, DISCRETIONARY)
FCI = bytes.fromhex("6F12840ED276000124010304000612345678A500")
GET_5F52 = bytes.fromhex("00CA5F5200")
GET_6E = bytes.fromhex("00CA006E00")
SELECT_NO_LE = bytes.fromhex("00A4040006D27600012401")  # case 4 as a T=0 stack sends it


def openpgp_card(apdu: bytes) -> bytes:
    """Answers like an OpenPGP 3.4 card that announces extended Lc/Le."""
    if apdu[:4] == GET_5F52[:4]:
        return HIST + OK
    if apdu[:4] == GET_6E[:4]:
        return APP_DATA + OK
    return OK


def strict_t1_card(apdu: bytes) -> bytes:
    """Returns data only when the command has Le (a strict T=1 card); never 61xx."""
    if apdu[1] == 0xA4:
        has_le = len(apdu) == 5 + apdu[4] + 1
        return (FCI + OK) if has_le else OK
    return OK


def linked(card: Callable[[bytes], bytes], protocol: int | None = 1, **kw) -> tuple[Link, list]:
    sent: list[bytes] = []

    def recording(apdu: bytes) -> bytes:
        sent.append(apdu)
        return card(apdu)

    link = Link(session=BridgeSession("r", **kw), card=recording)
    link.session.handle(events.CardInserted(T1_ATR if protocol == 1 else DUAL_ATR, protocol))
    link.connect()
    return link, sent


def guest_gets(link: Link, apdu: bytes) -> bytes:
    seq = link.guest(apdu)
    answer = link.device.answer_for(seq)
    assert answer is not None and answer.outcome is Outcome.RESPONSE
    return answer.data


def applied(link: Link) -> list[events.PresentationApplied]:
    return link.of(events.PresentationApplied)


# P1 -------------------------------------------------------------------------


def test_p1_clears_extended_length_in_5f52_and_nothing_else() -> None:
    link, sent = linked(openpgp_card)
    assert guest_gets(link, GET_5F52) == HIST_CLEARED + OK
    assert sent == [GET_5F52]  # the command itself is not touched
    (event,) = applied(link)
    assert (event.rule, event.where) == ("ext-length", "GET DATA 5F52")


def test_p1_is_logged_once_per_card() -> None:
    link, _ = linked(openpgp_card)
    for _ in range(3):
        assert guest_gets(link, GET_5F52) == HIST_CLEARED + OK
    assert len(applied(link)) == 1
    link.handle(events.CardRemoved())
    link.handle(events.CardInserted(T1_ATR, 1))
    assert guest_gets(link, GET_5F52) == HIST_CLEARED + OK
    assert len(applied(link)) == 2


def test_p1_leaves_a_card_without_extended_length_alone() -> None:
    link, _ = linked(lambda apdu: HIST_CLEARED + OK)
    assert guest_gets(link, GET_5F52) == HIST_CLEARED + OK
    assert not applied(link) and not link.of(events.PresentationSkipped)


def test_p1_leaves_error_answers_alone() -> None:
    link, _ = linked(lambda apdu: HIST + b"\x62\x83")
    assert guest_gets(link, GET_5F52) == HIST + b"\x62\x83"


def test_p1_can_be_switched_off() -> None:
    link, _ = linked(openpgp_card, keep=frozenset({"ext-length"}))
    assert guest_gets(link, GET_5F52) == HIST + OK
    assert not applied(link)


def test_p1_applies_on_t0_cards_too() -> None:
    """The guest's reader is T=0 whatever the host talks: P1 does not depend on it."""
    link, _ = linked(openpgp_card, protocol=0)
    assert guest_gets(link, GET_5F52) == HIST_CLEARED + OK


def test_broken_historical_bytes_pass_unchanged_with_one_event() -> None:
    broken = bytes.fromhex("0079C021059000")  # 79: tag 7, 9 bytes that are not there
    link, _ = linked(lambda apdu: broken + OK)
    for _ in range(2):
        assert guest_gets(link, GET_5F52) == broken + OK
    (skipped,) = link.of(events.PresentationSkipped)
    assert skipped.rule == "ext-length" and "past the end" in skipped.reason
    assert not applied(link)


# P2 -------------------------------------------------------------------------


def test_p2_caps_7f66_in_006e_and_keeps_the_rest() -> None:
    link, _ = linked(openpgp_card, protocol=0)  # on any card: the guest's reader is T=0
    got = guest_gets(link, GET_6E)
    capped = bytes.fromhex("7F66080202 00FF 0202 0100".replace(" ", ""))
    assert got == APP_DATA.replace(EXT_INFO, capped) + OK
    assert HIST in got  # 5F52 inside 006E: read by nobody, left alone
    (event,) = applied(link)
    assert (event.rule, event.where) == ("max-length", "GET DATA 006E")


def test_p2_leaves_small_limits_and_a_template_without_7f66_alone() -> None:
    small = template_6e(AID, bytes.fromhex("7F660802020080020200F0"))
    for data in (small, template_6e(AID, DISCRETIONARY)):
        link, _ = linked(lambda apdu, data=data: data + OK)
        assert guest_gets(link, GET_6E) == data + OK
        assert not applied(link)


def test_p2_garbage_passes_unchanged() -> None:
    cases = [
        b"\x6e\x20" + AID,  # template longer than the answer
        template_6e(AID) + b"\x00",  # trailing byte
        b"\x65\x02\x5b\x00",  # not 6E
        template_6e(AID, bytes.fromhex("7F6604020208")),  # 7F66 of the wrong shape
        template_6e(AID, bytes.fromhex("7F6685")),  # bad BER length
    ]
    for data in cases:
        link, _ = linked(lambda apdu, data=data: data + OK)
        assert guest_gets(link, GET_6E) == data + OK
        assert len(link.of(events.PresentationSkipped)) == 1, data.hex()
        assert not applied(link)


# P3 -------------------------------------------------------------------------


def test_p3_strict_t1_card_case4_data_reaches_the_guest_as_61xx_and_get_response() -> None:
    link, sent = linked(strict_t1_card, protocol=1)
    first = guest_gets(link, SELECT_NO_LE)
    assert first == bytes([0x61, len(FCI)])
    assert sent == [SELECT_NO_LE + b"\x00"]  # Le added on the way to the card
    rest = guest_gets(link, bytes([0x00, 0xC0, 0x00, 0x00, len(FCI)]))
    assert rest == FCI + OK
    assert sent == [SELECT_NO_LE + b"\x00"]  # GET RESPONSE served by the bridge
    (event,) = applied(link)
    assert event.rule == "le"


def test_without_p3_the_strict_card_loses_the_data() -> None:
    """The control: the same exchange with the rule off gives a bare 9000."""
    link, sent = linked(strict_t1_card, protocol=1, keep=frozenset({"le"}))
    assert guest_gets(link, SELECT_NO_LE) == OK
    assert sent == [SELECT_NO_LE]


def test_p3_only_for_t1_cards() -> None:
    for protocol in (0, None):  # a dual T=0/T=1 ATR: unknown means "maybe T=0"
        link, sent = linked(strict_t1_card, protocol=protocol)
        assert guest_gets(link, SELECT_NO_LE) == OK
        assert sent == [SELECT_NO_LE]


def test_p3_protocol_unknown_but_the_atr_offers_only_t1() -> None:
    link = Link(session=BridgeSession("r"), card=strict_t1_card)
    link.session.handle(events.CardInserted(T1_ATR))  # the runtime did not say
    link.connect()
    assert guest_gets(link, SELECT_NO_LE) == bytes([0x61, len(FCI)])


def test_p3_never_touches_case3_or_commands_with_le() -> None:
    untouched = [
        bytes.fromhex("0020008106313233343536"),  # VERIFY: case 3, PIN data
        bytes.fromhex("00DA005B0461626364"),  # PUT DATA
        bytes.fromhex("00A4040C06D27600012401"),  # SELECT, P2=0C: no response data
        bytes.fromhex("00A4040006D2760001240100"),  # SELECT with Le already
        bytes.fromhex("002A9E9A00"),  # no data: case 2
        bytes.fromhex("00D6000004010203"),  # UPDATE BINARY
        bytes.fromhex("80CB3FFF055C035FC10500"),  # proprietary class
    ]
    link, sent = linked(lambda apdu: OK, protocol=1)
    for apdu in untouched:
        assert guest_gets(link, apdu) == OK
    assert sent == untouched
    assert not applied(link)


def test_p3_card_without_data_gets_its_answer_through() -> None:
    link, sent = linked(lambda apdu: b"\x6a\x82", protocol=1)
    assert guest_gets(link, SELECT_NO_LE) == b"\x6a\x82"
    assert sent == [SELECT_NO_LE + b"\x00"]


def test_p3_chain_dropped_by_another_command() -> None:
    link, sent = linked(strict_t1_card, protocol=1)
    assert guest_gets(link, SELECT_NO_LE)[:1] == b"\x61"
    assert guest_gets(link, GET_5F52) == OK  # goes to the card: the buffer is gone
    assert sent[-1] == GET_5F52


def test_presentation_events_carry_no_apdu_data() -> None:
    link, _ = linked(strict_t1_card, protocol=1)
    verify = bytes.fromhex("0020008106313233343536")
    guest_gets(link, verify)
    guest_gets(link, SELECT_NO_LE)
    text = repr(link.of(events.PresentationApplied) + link.of(events.PresentationSkipped))
    assert "313233343536" not in text and "123456" not in text


def test_unknown_rule_names_are_refused() -> None:
    try:
        Presentation(frozenset({"ext-lenght"}))
    except ValueError as exc:
        assert "ext-lenght" in str(exc)
    else:
        raise AssertionError("accepted an unknown rule")
    assert set(RULES) == {"ext-length", "max-length", "le"}


# properties -------------------------------------------------------------------


def answer(p: Presentation, command: bytes, data: bytes, seq: int = 7) -> bytes:
    p.command(seq, command)
    return p.response(seq, data).data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40), st.binary(min_size=2, max_size=2))
def test_5f52_answers_change_at_most_the_extended_length_bit(body: bytes, sw: bytes) -> None:
    p = Presentation()
    p.card(T1_ATR, 1)
    out = answer(p, GET_5F52, body + sw)
    assert len(out) == len(body) + 2 and out[-2:] == sw
    diff = [i for i in range(len(out)) if out[i] != (body + sw)[i]]
    assert len(diff) <= 1
    for i in diff:
        assert (body[i] ^ out[i]) == 0x40 and body[i] & 0x40 and sw == OK


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x4F, 0x5F52, 0x7F66, 0x73, 0xC0, 0x7F74]),
                          st.binary(max_size=12)), max_size=6),
       st.booleans())
def test_006e_answers_change_at_most_7f66_values(children, garble: bool) -> None:
    def tlv(tag: int, value: bytes) -> bytes:
        return tag.to_bytes(2 if tag > 0xFF else 1, "big") + bytes([len(value)]) + value

    data = template_6e(*(tlv(t, v) for t, v in children))
    if garble and len(data) > 3:
        data = data[:-1]  # one byte short: the template no longer parses
    p = Presentation()
    p.card(T1_ATR, 1)
    out = answer(p, GET_6E, data + OK)
    assert len(out) == len(data) + 2
    start = data.find(b"\x7f\x66\x08\x02\x02")
    for i in range(len(data)):
        if out[i] != data[i]:
            assert not garble and start >= 0
            assert i in (start + 5, start + 6, start + 9, start + 10)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=4, max_size=300), st.binary(min_size=2, max_size=300),
       st.sampled_from([0, 1, None]))
def test_commands_and_answers_outside_the_rules_pass_unchanged(command: bytes, reply: bytes,
                                                               protocol) -> None:
    p = Presentation()
    p.card(DUAL_ATR, protocol)
    sent = p.command(1, command)
    got = p.response(1, reply)
    if sent != command:  # only P3 changes commands: append Le 00, nothing else
        assert protocol == 1 and sent == command + b"\x00"
        assert got.data == reply and got.defer == (len(reply) > 2)
    elif command[1:2] != b"\xca":
        assert got.data == reply and not got.defer


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.sampled_from([GET_5F52, GET_6E, bytes.fromhex("00CA5F5208")]))
def test_garbage_answers_through_the_session_reach_the_guest_unchanged(
    garbage: bytes, command: bytes
) -> None:
    reply = garbage + OK
    link, _ = linked(lambda apdu: reply)
    got = guest_gets(link, command)
    pure = answer(Presentation(), command, reply)
    assert got == pure  # the session applies exactly the rule, nothing more
    if link.of(events.PresentationSkipped) or not applied(link):
        assert got == reply  # not parsable, or nothing to change: byte for byte


def test_announce_t0_clears_the_atr_extended_length_bit_and_nothing_else() -> None:
    """P1's ATR part lives in R8's rewrite: only TD1, the bit and TCK change."""
    sent = announce_t0(T1_ATR)
    diff = [i for i in range(len(T1_ATR)) if sent[i] != T1_ATR[i]]
    assert diff == [5, 13, len(T1_ATR) - 1]
    assert sent[5] == 0x80 and sent[13] == T1_ATR[13] & ~0x40
    assert announce_t0(DUAL_ATR) == DUAL_ATR  # offers T=0: left byte for byte


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=15))
def test_announce_t0_changes_only_td1_the_bit_and_tck(historical: bytes) -> None:
    body = bytes([0xF0 | len(historical)]) + bytes.fromhex("1300008131FE15") + historical
    atr = b"\x3b" + body + bytes([tck(body)])
    sent = announce_t0(atr)
    assert len(sent) == len(atr)
    for i in range(len(atr)):
        if sent[i] != atr[i]:
            assert i in (5, len(atr) - 1) or (atr[i] ^ sent[i]) == 0x40


def test_reader_keep_attribute_parses_and_refuses_unknown_rules(tmp_path) -> None:
    from ccidbridge.config import load
    from ccidbridge.config.errors import ConfigError

    def config(keep: str):
        path = tmp_path / "c.xml"
        path.write_text(
            "<ccidbridge>\n  <smartcard mode='passthrough' type='unix'>\n"
            "    <source mode='bind' path='/tmp/x.sock'/>\n"
            f"    <reader name='r' keep='{keep}'/>\n  </smartcard>\n</ccidbridge>\n"
        )
        return path

    (device,) = load(str(config("ext-length le"))).devices.smartcards
    assert device.reader.keep == frozenset({"ext-length", "le"})
    try:
        load(str(config("ext-length bogus")))
    except ConfigError as exc:
        assert ":4:" in str(exc) and "bogus" in str(exc) and "max-length" in str(exc)
    else:
        raise AssertionError("accepted an unknown rule")


def test_the_config_vocabulary_names_exactly_these_rules() -> None:
    """<reader keep=...> takes the rule names this module defines, and 'all'."""
    import re

    from ccidbridge.config.vocabulary import KEEP_PATTERN

    names = set(re.findall(r"[a-z-]+", KEEP_PATTERN.split(")")[0]))
    assert names == {*RULES, "all"}
