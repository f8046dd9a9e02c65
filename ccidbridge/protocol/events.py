"""Events a :class:`~ccidbridge.protocol.session.BridgeSession` takes and gives.

Inputs ("the runtime tells the session") are passed to ``session.handle()``;
outputs ("the session tells the runtime") come from ``session.events()``.
All are small frozen values.  Fields that carry APDU or card data are left
out of ``repr()``: what of an APDU may be logged is decided by one function
(runtime/apdulog.py), never by a generic repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ccidbridge.protocol.errors import VSCardError

# -- inputs: what happened on the host side -----------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    """A new connection to QEMU's chardev is up; start the handshake."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is gone (either side closed it, or it failed)."""


@dataclass(frozen=True, slots=True)
class CardInserted:
    """A card is present with this ATR: inserted, reset, or found at start.

    ``protocol``: what the host talks to the card with (0 or 1; None when
    unknown).  Rule P3 (presentation.py) acts only on T=1 cards.
    """

    atr: bytes
    protocol: int | None = None


@dataclass(frozen=True, slots=True)
class CardRemoved:
    """The host card (or its reader) is gone, or stopped answering."""


@dataclass(frozen=True, slots=True)
class ApduResponse:
    """The card answered request ``seq`` with ``data`` (including SW1 SW2)."""

    seq: int
    data: bytes = field(repr=False)  # card data: never in a generic repr (apdulog decides)


@dataclass(frozen=True, slots=True)
class ApduFailed:
    """Request ``seq`` could not be carried to the card or back."""

    seq: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The bridge is stopping: tell QEMU the card and reader are gone."""


@dataclass(frozen=True, slots=True)
class ReleaseAtr:
    """The pause asked for by HoldAtr(token) is over (R10)."""

    token: int


# -- outputs: what the runtime must do or may log ----------------------------


@dataclass(frozen=True, slots=True)
class TransmitApdu:
    """Send ``apdu`` to the card and answer with ApduResponse/ApduFailed(seq)."""

    seq: int
    apdu: bytes = field(repr=False)  # may hold a PIN: never in a generic repr (apdulog decides)


@dataclass(frozen=True, slots=True)
class HoldAtr:
    """Send ReleaseAtr(token) after ``seconds``: the guest must see the card
    gone for that long before it is announced again (R10)."""

    token: int
    seconds: float


@dataclass(frozen=True, slots=True)
class PeerInit:
    """The peer sent Init (a reply to ours, or unsolicited with wait=on)."""

    version: int
    capabilities: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Synchronized:
    """QEMU acked the resync: it knows the reader and the current card state."""

    card_present: bool


@dataclass(frozen=True, slots=True)
class AtrAccepted:
    atr: bytes


@dataclass(frozen=True, slots=True)
class AtrRewritten:
    """The card's ATR was changed before it went to QEMU (T=1-only card)."""

    original: bytes
    sent: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class AtrRefused:
    """QEMU answered the ATR with an error: the guest sees no card."""

    atr: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ControlRefused:
    """QEMU answered a control message other than ATR with an error code."""

    message: str
    code: int


@dataclass(frozen=True, slots=True)
class PresentationApplied:
    """Presentation rule ``rule`` changed what the card says (once per card)."""

    rule: str
    where: str
    detail: str


@dataclass(frozen=True, slots=True)
class PresentationSkipped:
    """The card's answer did not parse as rule ``rule`` expects: passed on
    unchanged (once per card)."""

    rule: str
    where: str
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseChained:
    """A response longer than QEMU's cap is being served as 61xx + GET RESPONSE."""

    seq: int
    total: int


@dataclass(frozen=True, slots=True)
class ApduAnsweredLocally:
    """A GET RESPONSE was served from the bridge's buffer, not the card."""

    apdu: bytes = field(repr=False)
    length: int


@dataclass(frozen=True, slots=True)
class ApduRefused:
    """An APDU from the guest was answered with VSC_Error at once."""

    apdu: bytes = field(repr=False)  # may hold a PIN
    reason: str


@dataclass(frozen=True, slots=True)
class PendingFailed:
    """Request ``seq`` was failed with VSC_Error before a card-state message (R6)."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class StaleApduDropped:
    """QEMU already settled this request when it processed our ATR/CardRemove."""

    apdu: bytes = field(repr=False)  # may hold a PIN


@dataclass(frozen=True, slots=True)
class LateResponseDropped:
    """The card answered a request that had already been failed or abandoned."""

    seq: int


@dataclass(frozen=True, slots=True)
class UnexpectedMessage:
    """A well-formed message the peer should not have sent; ignored."""

    description: str


@dataclass(frozen=True, slots=True)
class PeerProtocolError:
    """The peer broke the protocol.  The runtime must close this connection."""

    error: VSCardError


@dataclass(frozen=True, slots=True)
class ShutdownComplete:
    """Every farewell message was acked (or there was nobody to tell)."""


InputEvent = (
    ConnectionOpened
    | ConnectionClosed
    | CardInserted
    | CardRemoved
    | ApduResponse
    | ApduFailed
    | Shutdown
    | ReleaseAtr
)


OutputEvent = (
    TransmitApdu
    | HoldAtr
    | PeerInit
    | Synchronized
    | AtrAccepted
    | AtrRewritten
    | AtrRefused
    | ControlRefused
    | PresentationApplied
    | PresentationSkipped
    | ResponseChained
    | ApduAnsweredLocally
    | ApduRefused
    | PendingFailed
    | StaleApduDropped
    | LateResponseDropped
    | UnexpectedMessage
    | PeerProtocolError
    | ShutdownComplete
)
