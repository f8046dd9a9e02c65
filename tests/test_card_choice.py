"""The reader choice, sans-IO: rules C1-C5 of ccidbridge/card/choice.py, tested
like the session — by example and by hypothesis over random reader views."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st
from smartcard import scard

from ccidbridge.card.choice import (
    MAX_WATCHED,
    Attach,
    Detach,
    Notice,
    Poke,
    ReaderChoice,
    atr_matches,
    reader_matches,
    usable,
)
from ccidbridge.spec import ReaderSpec

PRESENT = scard.SCARD_STATE_PRESENT
EMPTY = scard.SCARD_STATE_EMPTY
MUTE = scard.SCARD_STATE_PRESENT | scard.SCARD_STATE_MUTE
ATR_A = bytes.fromhex("3B8A800163636964627269646765")
ATR_B = bytes.fromhex("3B8F8001804F0CA0000003060300030000000068")


def present(counter: int, extra: int = 0) -> int:
    return (counter << 16) | PRESENT | extra


def test_atr_and_reader_matching() -> None:
    assert atr_matches(ATR_A, None, None)
    assert atr_matches(ATR_A, ATR_A, None) and not atr_matches(ATR_A, ATR_B, None)
    masked = ATR_A[:-3] + b"\x00\x00\x00"
    mask = b"\xff" * (len(ATR_A) - 3) + b"\x00\x00\x00"
    assert atr_matches(ATR_A, masked, mask) and not atr_matches(ATR_A, masked, None)
    assert not atr_matches(ATR_A[:-1], masked[:-1] + b"\x01", mask[:-1] + b"\xff")
    assert reader_matches(ReaderSpec(name="A 00 00"), "A 00 00")
    assert not reader_matches(ReaderSpec(name="A 00"), "A 00 00")
    assert reader_matches(ReaderSpec(match="Virtual PCD B *"), "Virtual PCD B 00 01")
    assert not reader_matches(ReaderSpec(match="Virtual PCD B *"), "Virtual PCD 00 01")
    assert reader_matches(ReaderSpec(), "anything")
    assert usable(present(1)) and not usable(EMPTY) and not usable(MUTE)


def test_first_reader_with_a_card_then_removal_and_a_new_card() -> None:
    choice = ReaderChoice(ReaderSpec())
    readers = ["R0", "R1"]
    out = choice.evaluate(readers, {"R0": (EMPTY, b""), "R1": (present(1), ATR_A)})
    assert out == [Attach("R1")]
    assert choice.evaluate(readers, {"R0": (EMPTY, b""), "R1": (present(1), ATR_A)}) == []
    # the counter moves only on insertion/removal (C4): same card, other bits -> Poke
    inuse = present(1, scard.SCARD_STATE_INUSE)
    assert choice.evaluate(readers, {"R1": (inuse, ATR_A)}) == [Poke("R1")]
    assert choice.evaluate(readers, {"R1": (present(3), ATR_B)}) == [
        Detach("card replaced"),
        Attach("R1"),
    ]
    assert choice.evaluate(readers, {"R1": (EMPTY, b"")})[0] == Detach("card removed")
    assert choice.evaluate(["R0"], {"R0": (present(1), ATR_A)}) == [Attach("R0")]
    assert choice.evaluate([], {})[:1] == [Detach("reader gone")]


def test_notices_said_once_per_condition() -> None:
    choice = ReaderChoice(ReaderSpec(name="Mine", atr=ATR_B))
    first = choice.evaluate(["Other"], {})
    assert first == [Notice("reader 'Mine' not found; waiting", logging.WARNING)]
    assert choice.evaluate(["Other"], {}) == []  # C5: not per retry
    out = choice.evaluate(["Mine"], {"Mine": (present(1), ATR_A)})
    assert Notice("found Mine") in out
    assert any("does not match" in n.message for n in out if isinstance(n, Notice))
    assert not any(isinstance(o, Attach) for o in out)
    assert choice.evaluate(["Mine"], {"Mine": (present(1), ATR_A)}) == []
    assert choice.evaluate(["Mine"], {"Mine": (present(2), ATR_B)}) == [Attach("Mine")]


def test_service_down_and_up() -> None:
    choice = ReaderChoice(ReaderSpec())
    choice.evaluate(["R"], {"R": (present(1), ATR_A)})
    down = choice.service_down()
    assert down[0] == Detach("pcscd stopped") and "not running" in down[1].message
    assert choice.service_down() == []
    assert choice.service_up() == [Notice("pcscd is running again")]
    assert choice.service_up() == []


def test_at_most_fifteen_readers_are_watched() -> None:
    """C2: pcsc-lite refuses more than 16 entries per SCardGetStatusChange, PnP included."""
    readers = [f"R{i:02d}" for i in range(16)]
    choice = ReaderChoice(ReaderSpec())
    assert len(choice.watched(readers)) == MAX_WATCHED == 15
    # a card in the 16th reader is only reachable by naming it
    named = ReaderChoice(ReaderSpec(name="R15"))
    assert named.evaluate(readers, {"R15": (present(1), ATR_A)}) == [Attach("R15")]


READERS = ["A 00", "A 01", "B 00", "B 01"]
states = st.sampled_from([EMPTY, present(1), present(2), MUTE, scard.SCARD_STATE_UNKNOWN])
views = st.tuples(
    st.lists(st.sampled_from(READERS), unique=True),
    st.dictionaries(st.sampled_from(READERS), st.tuples(states, st.sampled_from([ATR_A, ATR_B]))),
)
specs = st.sampled_from(
    [
        ReaderSpec(),
        ReaderSpec(name="A 01"),
        ReaderSpec(match="B *"),
        ReaderSpec(atr=ATR_B),
    ]
)


@settings(max_examples=400, deadline=None)
@given(specs, st.lists(views, min_size=1, max_size=25))
def test_random_views_keep_the_rules(spec: ReaderSpec, sequence: list) -> None:
    choice = ReaderChoice(spec)
    bound: str | None = None
    for readers, view in sequence:
        view = {r: s for r, s in view.items() if r in readers}
        out = choice.evaluate(readers, view)
        for item in out:
            if isinstance(item, Attach):
                assert bound is None, "attached twice without a detach"
                event, atr = view[item.reader]
                assert reader_matches(spec, item.reader)  # C1
                assert usable(event) and atr_matches(atr, spec.atr, spec.atr_mask)  # C3
                bound = item.reader
            elif isinstance(item, Detach):
                assert bound is not None, "detached with nothing bound"
                bound = None
            elif isinstance(item, Poke):
                assert item.reader == bound
        assert choice.bound == bound
        # C5 and C4: the same view again changes nothing and says nothing
        assert choice.evaluate(readers, view) == []
