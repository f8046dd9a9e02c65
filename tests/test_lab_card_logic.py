"""Our vpcd test card's logic and APDU parser, without any transport (no stack needed)."""

from __future__ import annotations

import pytest

from lab.vpcd_card import (
    ATR_PRESETS,
    Apdu,
    Behaviour,
    CardLogic,
    Crash,
    Hang,
    parse_atr,
    pattern,
)


def run(logic: CardLogic, hexapdu: str) -> bytes:
    return logic.process(bytes.fromhex(hexapdu))


@pytest.mark.parametrize(
    ("raw", "data", "le"),
    [
        ("00A40400", b"", None),  # case 1
        ("0084000008", b"", 8),  # case 2 short
        ("0084000000", b"", 256),
        ("00200000023132", b"12", None),  # case 3 short
        ("0020000002313200", b"12", 256),  # case 4 short
        ("00B00000000400", b"", 1024),  # case 2 extended
        ("00B00000000000", b"", 65536),
        ("801000000000020102", b"\x01\x02", None),  # case 3 extended
        ("8010000000000201020010", b"\x01\x02", 16),  # case 4 extended
    ],
)
def test_apdu_parse(raw: str, data: bytes, le: int | None) -> None:
    a = Apdu.parse(bytes.fromhex(raw))
    assert (a.data, a.le) == (data, le)


@pytest.mark.parametrize("raw", ["00A404", "0020000005313233", "002000000131FFFF"])
def test_bad_apdus_get_6700(raw: str) -> None:
    assert run(CardLogic(), raw) == b"\x67\x00"


def test_pin_counter_blocks() -> None:
    c = CardLogic()
    assert run(c, "0020000000") == b"\x63\xc3"
    assert run(c, "002000000430303030") == b"\x63\xc2"
    assert run(c, "002000000431323334") == b"\x90\x00"  # resets the counter
    for left in (2, 1, 0):
        assert run(c, "002000000430303030") == bytes([0x63, 0xC0 | left])
    assert run(c, "002000000431323334") == b"\x69\x83"  # blocked


def test_echo_status_count_unknown() -> None:
    c = CardLogic()
    c.power_on()
    assert run(c, "8010000000") == pattern(256) + b"\x90\x00"
    assert run(c, "80100176") == pattern(374) + b"\x90\x00"
    assert run(c, "801000000301020300") == b"\x01\x02\x03\x90\x00"
    assert run(c, "80126283") == b"\x62\x83"
    assert run(c, "8014000004") == b"\x00\x00\x00\x05\x90\x00"  # counts itself
    assert run(c, "00EE0000") == b"\x6d\x00"
    assert run(c, "80EE0000") == b"\x6d\x00"
    assert run(c, "FFCA000000") == b"\x6e\x00"


def test_read_binary_and_select() -> None:
    c = CardLogic()
    assert run(c, "00B0000004") == b"\x69\x86"
    assert run(c, "00B0810004") == pattern(4) + b"\x90\x00"  # SFI 1
    assert run(c, "00A4000C023F01") == b"\x6a\x82"
    assert run(c, "00A4000C020101") == b"\x90\x00"
    assert run(c, "00B003FC08") == pattern(4, 0x3FC) + b"\x62\x82"  # short read at the end
    assert run(c, "00B0040001") == b"\x6b\x00"
    c.power_off()
    assert run(c, "00B0000004") == b"\x69\x86"  # power cycle deselects


def test_challenge_modes() -> None:
    assert run(CardLogic(), "00840000") == b"\x67\x00"
    c = CardLogic()
    assert run(c, "0084000004") == pattern(4) + b"\x90\x00"
    assert run(c, "0084000004") == pattern(4, 4) + b"\x90\x00"
    r = CardLogic(behaviour=Behaviour(random_challenge=True))
    assert len(run(r, "0084000010")) == 18


def test_faults_and_behaviour_cli() -> None:
    b = Behaviour.parse(["hang=88", "crash=b0", "slow=2.5", "random"])
    assert b == Behaviour(frozenset({0x88}), frozenset({0xB0}), 2.5, True)
    assert Behaviour.parse(b.to_args()[1::2]) == b
    c = CardLogic(behaviour=b)
    with pytest.raises(Hang):
        run(c, "0088000000")
    with pytest.raises(Crash):
        run(c, "00B0000001")
    with pytest.raises(ValueError):
        Behaviour.parse(["explode=1"])


def test_atr_presets() -> None:
    assert parse_atr("T1") == bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")
    assert parse_atr("3b:02 14:50") == bytes.fromhex("3B021450")
    dual = ATR_PRESETS["dual"]
    tck = 0
    for b in dual[1:]:
        tck ^= b
    assert tck == 0  # TCK present and right
