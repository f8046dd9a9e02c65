"""Wire a BridgeSession to a QemuDevice twin in memory (no sockets).

The "card" is a function of the APDU, so a test can tell which request an
answer belongs to.  ``hold_card=True`` keeps TransmitApdu requests unanswered
until the test answers them.
"""

from __future__ import annotations

from collections.abc import Callable

from ccidbridge.protocol import events
from ccidbridge.protocol.decoder import FrameDecoder
from ccidbridge.protocol.messages import Message, decode
from ccidbridge.protocol.session import BridgeSession
from lab.twin import QemuDevice


def echo_card(apdu: bytes) -> bytes:
    """A card whose answer names the command: its bytes reversed, then 9000."""
    return apdu[::-1] + b"\x90\x00"


class Link:
    def __init__(
        self,
        session: BridgeSession | None = None,
        device: QemuDevice | None = None,
        card: Callable[[bytes], bytes] | None = echo_card,
        hold_card: bool = False,
        auto_release: bool = True,
    ) -> None:
        self.auto_release = auto_release
        self.holds: list[events.HoldAtr] = []
        self.session = session or BridgeSession("Test Reader")
        self.device = device or QemuDevice()
        self.card = card
        self.hold_card = hold_card
        self.events: list[object] = []
        self.held: list[events.TransmitApdu] = []
        self.to_qemu: list[Message] = []  # every message the session sent, decoded
        self._check = FrameDecoder()

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def connect(self) -> None:
        self.device.connect()
        self.session.handle(events.ConnectionOpened())
        self.pump()

    def disconnect(self) -> None:
        self.device.disconnect()
        self.session.handle(events.ConnectionClosed())
        self.pump()

    def handle(self, event: object) -> None:
        self.session.handle(event)
        self.pump()

    def pump(self, rounds: int = 100) -> None:
        for _ in range(rounds):
            moved = False
            out = self.session.data_to_send()
            if out:
                moved = True
                frames = self._check.feed(out)
                assert self._check.buffered == 0, "session produced a partial frame"
                self.to_qemu += [decode(f) for f in frames]
                if self.device.connected:
                    self.device.receive_data(out)
            back = self.device.data_to_send()
            if back:
                moved = True
                self.session.receive_data(back)
            for ev in self.session.events():
                moved = True
                self.events.append(ev)
                if isinstance(ev, events.HoldAtr):
                    if self.auto_release:  # the pause passes at once here
                        self.session.handle(events.ReleaseAtr(ev.token))
                    else:
                        self.holds.append(ev)
                elif isinstance(ev, events.TransmitApdu):
                    if self.hold_card or self.card is None:
                        self.held.append(ev)
                    else:
                        self.session.handle(events.ApduResponse(ev.seq, self.card(ev.apdu)))
            if not moved:
                return
        raise AssertionError("link did not settle")

    def answer_held(self) -> None:
        held, self.held = self.held, []
        for ev in held:
            self.session.handle(events.ApduResponse(ev.seq, self.card(ev.apdu)))
        self.pump()

    def guest(self, apdu: bytes) -> int:
        seq = self.device.guest_transmit(apdu)
        self.pump()
        return seq
