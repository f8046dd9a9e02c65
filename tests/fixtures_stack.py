"""pytest fixtures for the lab: pcscd + vpcd readers, test cards, vicc, QEMU.

Loaded from tests/conftest.py (``pytest_plugins``).  Everything that starts a
process stops it by pid in a ``finally``/teardown, so a failing test never
leaks a card, vicc or QEMU into the next one.

* ``pcsc_stack`` (session): a :class:`PcscStack` with 2 vpcd entries = 4 slots.
  Need more?  ``pcsc_stack.ensure_slots(n)`` (restarts pcscd; do it before
  inserting cards).  Skips when not inside ``.ci/isolated``.
* ``test_card`` (function): factory ``test_card(atr="dual", behaviour=None, *,
  reader=None, process=True, wait=True) -> InsertedCard``; every card it made
  is removed (and its slot freed) at teardown.
* ``card_keys`` (session): a directory with the test cards' keys
  (lab/cards/keys.py), generated once per session.
* ``own_card`` (function): factory ``own_card(spec, *, process=True,
  reader=None) -> CardInSlot`` for the OpenPGP, PIV and strict T=1 cards
  (``lab.cards.openpgp.spec(card_keys)`` etc.); PRESENT when returned, all
  removed at teardown.
* ``vicc_card`` (function): a running Debian vicc (iso7816) on a free slot.
* ``qemu_passthru`` (function): factory ``qemu_passthru(transport="tcp",
  server=True, n_cards=1, debug=False, ...) -> QemuPassthru`` (started); all
  killed at teardown.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.cards.keys import ensure_keys
from lab.cards.slot import CardInSlot
from lab.cards.vpcd import CardSpec
from lab.pcsc import InsertedCard, PcscStack
from lab.qemu import QemuPassthru
from lab.vicc import SYSTEM_PYTHON, ViccProcess
from lab.vpcd_card import Behaviour


def missing(reason: str) -> None:
    """A component a test needs is not there.

    Inside ``.ci/isolated`` (``make test``, which installs every component)
    that is a failure: a skip would hide a broken install.  Elsewhere (plain
    pytest on a developer's machine) it is a skip that says what is missing.
    """
    if os.environ.get("CCIDBRIDGE_ISOLATED") == "1":
        pytest.fail(f"{reason} (make test installs it: see .ci/debian-packages)", pytrace=False)
    pytest.skip(reason)


def require_isolation() -> None:
    if os.environ.get("CCIDBRIDGE_ISOLATED") != "1":
        pytest.skip("needs the private namespace: run under .ci/isolated")


@pytest.fixture(scope="session")
def pcsc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscStack]:
    """pcscd with 4 vpcd slots, for the whole session (restarted if a test killed it)."""
    require_isolation()
    if not Path("/usr/sbin/pcscd").exists():
        missing("pcscd not installed")
    stack = PcscStack(2, workdir=tmp_path_factory.mktemp("pcsc"))
    stack.start()
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def _pcsc_alive(pcsc_stack: PcscStack) -> PcscStack:
    """The session stack, restarted first if an earlier test left pcscd stopped."""
    if not pcsc_stack.running:
        pcsc_stack.start()
    return pcsc_stack


@pytest.fixture
def test_card(_pcsc_alive: PcscStack) -> Iterator[Callable[..., InsertedCard]]:
    """Factory: insert our vpcd test card into a free slot; all removed at teardown."""
    made: list[InsertedCard] = []

    def make(
        atr: bytes | str = "dual",
        behaviour: Behaviour | list[str] | None = None,
        **kwargs: Any,
    ) -> InsertedCard:
        if isinstance(behaviour, list):
            behaviour = Behaviour.parse(behaviour)
        card = _pcsc_alive.insert_card(atr, behaviour, **kwargs)
        made.append(card)
        return card

    try:
        yield make
    finally:
        for card in reversed(made):
            card.close()


@pytest.fixture(scope="session")
def card_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key directory every test card of this session loads (lab/cards/keys.py)."""
    d = tmp_path_factory.mktemp("card-keys")
    ensure_keys(d)
    return d


@pytest.fixture
def own_card(_pcsc_alive: PcscStack) -> Iterator[Callable[..., CardInSlot]]:
    """Factory: one of lab/cards' cards PRESENT in a free slot; all removed at teardown."""
    made: list[CardInSlot] = []

    def make(spec: CardSpec, *, process: bool = True, reader: str | None = None) -> CardInSlot:
        card = CardInSlot(_pcsc_alive, spec, process=process, reader=reader)
        made.append(card)
        return card.insert()

    try:
        yield make
    finally:
        for card in reversed(made):
            card.close()


@pytest.fixture
def vicc_card(_pcsc_alive: PcscStack) -> Iterator[ViccProcess]:
    """Debian's vicc (-t iso7816, through the fixed wrapper) PRESENT in a free slot."""
    if not Path(SYSTEM_PYTHON).exists() or not Path("/usr/bin/vicc").exists():
        missing("vsmartcard-vpicc not installed")
    vicc = ViccProcess(_pcsc_alive)
    try:
        vicc.start()
        yield vicc
    finally:
        vicc.close()


@pytest.fixture
def qemu_passthru(tmp_path: Path) -> Iterator[Callable[..., QemuPassthru]]:
    """Factory: start QEMU alone with ccid-card-passthru; all killed at teardown."""
    require_isolation()
    if shutil.which("qemu-system-x86_64") is None:
        missing("qemu-system-x86_64 not installed")
    made: list[QemuPassthru] = []

    def make(transport: str = "tcp", **kwargs: Any) -> QemuPassthru:
        kwargs.setdefault("workdir", tmp_path / f"qemu{len(made)}")
        q = QemuPassthru(transport, **kwargs)
        made.append(q)
        return q.start()

    try:
        yield make
    finally:
        for q in made:
            q.close()
