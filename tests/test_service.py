"""The service: every card its own bridge, a failing one restarted, a card that
cannot be served at all said once; what `ccidbridge run` runs by default."""

from __future__ import annotations

import threading
from pathlib import Path

from ccidbridge.card.base import CardReport
from ccidbridge.runtime.service import CardLog, Service
from ccidbridge.spec import Endpoint, ServedCard
from lab.device_peer import DevicePeer
from lab.instant_card import InstantCard
from lab.twin import Outcome
from tests.bridgeharness import served_card


class FailsOnce(InstantCard):
    """A card side with a bug: its first report raises."""

    failures = 0

    def reports(self, now: float) -> list[CardReport]:
        if FailsOnce.failures == 0:
            FailsOnce.failures += 1
            raise RuntimeError("a bug in the card side")
        return super().reports(now)


def _serve(service: Service) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(service.run()), daemon=True)
    thread.start()
    return thread, status


def test_a_bridge_that_fails_is_restarted_and_its_neighbour_never_notices(tmp_path: Path) -> None:
    with (
        DevicePeer("unix", path=str(tmp_path / "a.sock")) as peer_a,
        DevicePeer("unix", path=str(tmp_path / "b.sock")) as peer_b,
    ):
        cards = [served_card(peer_a.endpoint, label="a"), served_card(peer_b.endpoint, label="b")]

        def factory(served: ServedCard, log: CardLog) -> InstantCard:
            return FailsOnce() if served.label == "a" else InstantCard()

        service = Service(cards, card_factory=factory)
        thread, status = _serve(service)
        try:
            peer_b.wait_card(True)
            assert peer_b.guest(b"\x00\xa4\x00\x00").outcome is Outcome.RESPONSE
            peer_a.wait_card(True, timeout=10)  # the restarted bridge (after RESTART_PAUSE)
            assert FailsOnce.failures == 1
            assert peer_a.guest(b"\x00\xa4\x00\x00").outcome is Outcome.RESPONSE
            assert peer_b.connections == 1  # b was never touched
        finally:
            service.request_stop()
            thread.join(10)
        assert status == [0]
        peer_a.wait_card(False)
        peer_b.wait_card(False)  # both said goodbye


def test_a_card_that_cannot_be_served_at_all_ends_the_service_with_1(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "notes.txt"
    not_a_socket.write_text("mine")
    card = served_card(Endpoint("unix", True, path=str(not_a_socket)), label="x")
    service = Service([card], card_factory=lambda served, log: InstantCard())
    thread, status = _serve(service)
    thread.join(10)
    assert status == [1] and "is not a socket" in service.failed["x"]
    assert not_a_socket.read_text() == "mine"
