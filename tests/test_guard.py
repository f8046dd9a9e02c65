"""The PIN-retry guard, the APDU policy and the selection they share, sans-IO:
by example (one per rule, G1..G8, P1..P6, S1..S4) and by property against a
model card (hypothesis).  On real cards through the bridge: tests/test_safety_pcsc.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from ccidbridge.protocol.gate import Gate
from ccidbridge.protocol.guard import PinGuard, carries_data, find_pw_status, spends_a_try
from ccidbridge.protocol.policy import Policy, aid_match
from ccidbridge.protocol.selection import Selection, channel, selected_aid
from ccidbridge.spec import ApduPolicy, PinGuardSpec, PolicyRule

OK = b"\x90\x00"
OPENPGP = bytes.fromhex("D27600012401")
PIV = bytes.fromhex("A00000030800001000")


def select(aid: bytes, cla: int = 0) -> bytes:
    return bytes([cla, 0xA4, 0x04, 0x00, len(aid)]) + aid


def verify(p2: int, pin: bytes = b"000000", cla: int = 0, ins: int = 0x20, p1: int = 0) -> bytes:
    return bytes([cla, ins, p1, p2, len(pin)]) + pin if pin else bytes([cla, ins, p1, p2])


def sw(x: int) -> bytes:
    return x.to_bytes(2, "big")


# -- selection (S1..S4) -------------------------------------------------------------


def test_selection_follows_successful_select_by_aid_per_channel() -> None:
    s = Selection()
    assert s.current(0x00) is None  # S4
    assert s.answered(select(PIV), OK)
    assert s.current(0x00) == PIV
    assert not s.answered(select(OPENPGP), sw(0x6A82))  # S2: failed, kept
    assert s.current(0x00) == PIV
    assert not s.answered(bytes.fromhex("00A4000C023F00"), OK)  # S2: by FID, kept
    assert s.answered(select(OPENPGP, cla=0x01), bytes.fromhex("6F009000"))  # S3
    assert (s.current(0x00), s.current(0x81), s.current(0x41)) == (PIV, OPENPGP, None)
    assert s.answered(select(OPENPGP), sw(0x6110))  # 61xx is success
    assert s.current(0x0C) == OPENPGP  # secure messaging, same channel
    s.forget()
    assert s.current(0x00) is None


def test_S4_manage_channel_forgets_the_channel_it_opens_or_closes() -> None:
    s = Selection()
    s.answered(select(PIV), OK)
    s.answered(select(OPENPGP, cla=0x02), OK)
    s.answered(select(OPENPGP, cla=0x01), OK)
    assert not s.answered(bytes.fromhex("0070800200"), b"\x6a\x81")  # failed: kept
    assert s.answered(bytes.fromhex("0070800200"), OK)  # close channel 2
    assert s.answered(bytes.fromhex("0170800000"), OK)  # close the channel CLA names (1)
    assert (s.current(0x00), s.current(0x01), s.current(0x02)) == (PIV, None, None)
    s.answered(select(OPENPGP, cla=0x03), OK)
    assert s.answered(bytes.fromhex("0070000001"), b"\x03" + OK)  # opened: the card chose 3
    assert s.current(0x03) is None and s.current(0x00) == PIV


def test_channels_and_extended_select() -> None:
    assert [channel(c) for c in (0x00, 0x03, 0x0F, 0x13, 0x40, 0x4F, 0x6F, 0x83)] == [
        0, 3, 3, 3, 4, 19, 19, 3]
    ext = bytes([0x00, 0xA4, 0x04, 0x00, 0x00, 0x00, len(PIV)]) + PIV
    assert selected_aid(ext) == PIV
    assert selected_aid(bytes.fromhex("00A4040000")) is None  # no data: not by name
    assert selected_aid(bytes.fromhex("00A40400060102")) is None  # Lc longer than the data


# -- the guard (G1..G8) -------------------------------------------------------------


def test_G3_what_spends_a_try() -> None:
    assert carries_data(verify(0x81)) and not carries_data(bytes.fromhex("0020008100"))
    assert not carries_data(bytes.fromhex("0020008100000A"))  # extended Le only
    assert spends_a_try(verify(0x81))
    assert not spends_a_try(verify(0x81, pin=b""))  # a status query
    assert not spends_a_try(verify(0x81, p1=0xFF))  # reset of the verification status
    assert spends_a_try(verify(0x81, ins=0x24))
    assert not spends_a_try(verify(0x81, ins=0x24, p1=0x01))
    assert spends_a_try(verify(0x80, ins=0x2C, p1=0x00))
    assert spends_a_try(verify(0x80, ins=0x2C, p1=0x01))
    assert not spends_a_try(verify(0x80, ins=0x2C, p1=0x02))


def test_G4_G5_a_counter_learned_from_63cx_refuses_the_last_try() -> None:
    g = PinGuard(keep=1)
    wrong = verify(0x80)
    assert g.check(wrong) is None  # G6: unknown
    g.answered(wrong, sw(0x63C2))
    assert g.check(wrong) is None  # 2 left: one may go
    g.answered(wrong, sw(0x63C1))
    refusal = g.check(wrong)
    assert refusal is not None and refusal.sw == sw(0x6983)
    assert "reference 80 has 1 try left" in refusal.reason
    # every INS form and class byte of every PIN command spends the same counter
    for cmd in (verify(0x80, cla=0x0C), verify(0x80, ins=0x21), verify(0x80, ins=0x24),
                verify(0x80, ins=0x25, cla=0x10), verify(0x80, cla=0x80)):
        assert g.check(cmd) is not None, cmd.hex()
    assert g.check(verify(0x80, pin=b"")) is None  # the query still goes
    assert g.check(verify(0x81)) is None  # another reference
    # RESET RETRY COUNTER spends the PUK's counter, not the PIN's (G1)
    assert g.check(verify(0x80, ins=0x2C)) is None


def test_G4_success_and_blocked_and_6300() -> None:
    g = PinGuard(keep=1)
    wrong = verify(0x80)
    g.answered(wrong, sw(0x63C1))
    g.answered(verify(0x80, pin=b""), sw(0x63C3))  # the query tells: 3 again
    assert g.tries(wrong) == 3
    g.answered(wrong, sw(0x6300))  # failed, no count: one less
    assert g.tries(wrong) == 2
    g.answered(wrong, OK)  # verified: reset, unknown again
    assert g.tries(wrong) is None
    g.answered(wrong, sw(0x6983))
    assert g.tries(wrong) == 0 and g.check(wrong) is not None
    # a successful RESET RETRY COUNTER resets the PIN's counter and its own
    rrc = verify(0x80, ins=0x2C, pin=b"12345678" + b"1234")
    g.answered(rrc, sw(0x63C2))
    assert g.tries(rrc) == 2
    g.answered(rrc, OK)
    assert g.tries(rrc) is None and g.tries(wrong) is None


def test_G2_counters_are_per_application_and_openpgp_pw1_is_81_and_82() -> None:
    s = Selection()
    g = PinGuard(keep=1, selection=s)
    s.answered(select(OPENPGP), OK)
    g.answered(verify(0x82), sw(0x63C1))
    assert g.check(verify(0x81)) is not None  # PW1 either way
    assert g.check(verify(0x83)) is None  # PW3 is its own
    s.answered(select(PIV), OK)
    assert g.check(verify(0x81)) is None  # another application
    s.answered(select(OPENPGP), OK)
    assert g.check(verify(0x81, cla=0x01)) is None  # another channel
    assert g.check(verify(0x81)) is not None


def test_G4_openpgp_pw_status_bytes_in_c4_and_6e() -> None:
    s = Selection()
    g = PinGuard(keep=1, selection=s)
    c4 = bytes([0x01, 127, 127, 127, 1, 0, 3])
    g.answered(bytes.fromhex("00CA00C400"), c4 + OK)  # nothing selected: not OpenPGP
    assert g.check(verify(0x81)) is None
    s.answered(select(OPENPGP), OK)
    g.answered(bytes.fromhex("00CA00C400"), c4 + OK)
    assert g.check(verify(0x81)) is not None and g.check(verify(0x83)) is None
    assert g.check(verify(0x81, ins=0x2C)) is not None  # the reset code: 0 left
    do73 = b"\x73" + bytes([2 + 7 + 4]) + b"\xc0\x02\x00\x00" + b"\xc4\x07" + bytes(
        [0, 127, 127, 127, 3, 3, 1])
    inner = b"\x4f\x02\x01\x02" + do73
    for answer in (b"\x6e" + bytes([len(inner)]) + inner, inner):  # with and without 6E
        g.forget()
        g.answered(bytes.fromhex("00CA006E00"), answer + OK)
        assert g.check(verify(0x81)) is None and g.check(verify(0x83)) is not None
    assert find_pw_status(0x006E, b"\x73\x85") is None  # malformed: nothing learned
    g.answered(bytes.fromhex("00CA006E00"), b"\x73\x85" + OK)


def test_G7_G8_forget_and_off() -> None:
    g = PinGuard(keep=1)
    g.answered(verify(0x80), sw(0x63C1))
    g.forget()
    assert g.check(verify(0x80)) is None
    off = PinGuard(keep=0)
    off.answered(verify(0x80), sw(0x63C1))
    assert off.check(verify(0x80)) is None
    two = PinGuard(keep=2)
    two.answered(verify(0x80), sw(0x63C2))
    assert two.check(verify(0x80)) is not None


# -- the policy (P1..P6) ------------------------------------------------------------


def rule(allow: bool = False, **kw: object) -> PolicyRule:
    fields = {k: frozenset(v) if isinstance(v, (set, range)) else v for k, v in kw.items()}
    return PolicyRule(allow=allow, text="<rule>", line=3, **fields)  # type: ignore[arg-type]


def test_P1_P2_first_match_decides_no_match_allows() -> None:
    p = Policy(ApduPolicy((rule(True, ins={0x47}, p2={0x9A}), rule(ins={0x47}),
                           rule(ins=range(0xE0, 0xF0)))))
    assert p.check(bytes.fromhex("0047009A00")) is None  # allowed by the first
    denial = p.check(bytes.fromhex("0047009C00"))
    assert denial is not None and denial.rule == 1 and denial.sw == b"\x69\x85"
    assert p.check(bytes.fromhex("00E6000000")) is not None
    assert p.check(bytes.fromhex("00B0000010")) is None
    assert p.check(b"\x00\x47") is None  # P5
    assert Policy(ApduPolicy()).check(bytes.fromhex("00E6000000")) is None


def test_P3_aid_rules_deny_in_doubt_and_allow_only_when_sure() -> None:
    assert aid_match(OPENPGP, OPENPGP + b"\x03\x04") == (True, True)
    assert aid_match(OPENPGP, OPENPGP[:5]) == (False, True)  # partial selection
    assert aid_match(OPENPGP, None) == (False, True)  # unknown
    assert aid_match(OPENPGP, PIV) == (False, False)
    s = Selection()
    deny = Policy(ApduPolicy((rule(aid=OPENPGP, ins={0xDA, 0xDB}),)), s)
    put = bytes.fromhex("00DA005E0141")
    assert deny.check(put) is not None  # nothing selected yet: maybe OpenPGP
    s.answered(select(PIV), OK)
    assert deny.check(put) is None
    s.answered(select(OPENPGP[:5]), OK)
    assert deny.check(put) is not None
    allow_first = Policy(ApduPolicy((rule(True, aid=OPENPGP), rule(ins={0xDA}))), s)
    assert allow_first.check(put) is not None  # partial: not surely OpenPGP
    s.answered(select(OPENPGP), OK)
    assert allow_first.check(put) is None


def test_gate_policy_first_then_guard_and_logged_once_per_rule() -> None:
    gate = Gate(PinGuardSpec(keep=1), ApduPolicy((rule(ins={0x2C, 0x2D}),)))
    first = gate.check(verify(0x80, ins=0x2C))
    again = gate.check(verify(0x80, ins=0x2D))
    assert first is not None and first.by == "policy" and first.first
    assert again is not None and not again.first
    gate.answered(verify(0x80), sw(0x63C1))
    pin = gate.check(verify(0x80))
    assert pin is not None and pin.by == "pin-guard" and pin.sw == b"\x69\x83"
    gate.forget()
    assert gate.check(verify(0x80)) is None
    refused = gate.check(verify(0x80, ins=0x2C))
    assert refused is not None and refused.first


# -- property: against a model card -------------------------------------------------


@dataclass
class ModelCard:
    """Two applications, each with PIN references 80 and 81 (3 tries, PIN 1234)."""

    tries: dict[tuple[bytes, int], int] = field(default_factory=dict)
    selected: bytes | None = None
    seen: int = 0

    def transmit(self, apdu: bytes) -> bytes:
        self.seen += 1
        if apdu[1] == 0xA4:
            aid = selected_aid(apdu)
            if aid in (OPENPGP, PIV):
                self.selected = aid
                return OK
            return sw(0x6A82)
        if self.selected is None:
            return sw(0x6985)
        key = (self.selected, apdu[3])
        left = self.tries.setdefault(key, 3)
        if not carries_data(apdu):
            return sw(0x63C0 | left) if left else sw(0x6983)
        if left == 0:
            return sw(0x6983)
        if apdu[5:] == b"1234":
            self.tries[key] = 3
            return OK
        self.tries[key] = left - 1
        return sw(0x63C0 | (left - 1))


commands = st.sampled_from([
    select(OPENPGP), select(PIV), select(b"\xf0\x00\x00\x00\x01"),
    verify(0x80, b"9999"), verify(0x81, b"9999"), verify(0x80, b"1234"), verify(0x81, b"1234"),
    verify(0x80, b""), verify(0x81, b""), verify(0x80, b"9999", ins=0x24, cla=0x0C),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(commands, max_size=40), st.integers(1, 3), st.integers(0, 3))
def test_the_guest_never_spends_a_known_counter_below_keep(
    cmds: list[bytes], start: int, keep: int
) -> None:
    card = ModelCard()
    for aid in (OPENPGP, PIV):
        for ref in (0x80, 0x81):
            card.tries[(aid, ref)] = start
    gate = Gate(PinGuardSpec(keep=keep), ApduPolicy())
    guard_knew: dict[tuple[bytes | None, int], bool] = {}
    for apdu in cmds:
        before = dict(card.tries)
        seen = card.seen
        refusal = gate.check(apdu)
        if refusal is not None:
            assert card.seen == seen and card.tries == before  # never reached the card
            key = (card.selected, apdu[3])
            assert keep > 0 and before[key] <= keep  # never refused without cause
            continue
        response = card.transmit(apdu)
        gate.answered(apdu, response)
        if apdu[1] in (0x20, 0x24) and card.selected is not None:
            key2 = (card.selected, apdu[3])
            if guard_knew.get(key2) and keep > 0:
                assert card.tries[key2] >= min(keep, before[key2])
            guard_knew[key2] = response[0] == 0x63 or response == sw(0x6983)
        if apdu[1] == 0xA4:
            guard_knew = {}  # the guard's knowledge is per application: start over
    assert all(v >= 0 for v in card.tries.values())
