"""Which host reader's card to serve, sans-IO.

:class:`ReaderChoice` is fed what the reader monitor sees — the reader list
and each reader's event state and ATR, or that pcscd went away or came back —
and answers with what the card side must do: :class:`Attach` a reader's card,
:class:`Detach` the one being served, :class:`Poke` it (its state moved, e.g.
another program let go of it), and :class:`Notice` lines for the log, each
condition said once until it ends.  It never calls PC/SC and has no clock.

Rules (facts behind them: docs/pcsc-lite.md):

C1  A reader is used only if the spec accepts it: exact ``name``, else the
    ``match`` glob, else any reader.
C2  At most MAX_WATCHED readers are watched: pcsc-lite refuses an
    SCardGetStatusChange over 16 entries, the PnP pseudo reader included
    (docs/pcsc-lite.md#P6).
C3  A card is usable when PRESENT and neither MUTE nor UNKNOWN; only a card
    whose ATR matches ``atr``/``atr-mask`` is attached.
C4  The bound card stays bound while its reader lists it present with the
    same event counter (the high word changes only on insertion and removal,
    docs/pcsc-lite.md#P4); any other state change is a Poke.
C5  Each notice is said once per condition, and said again only after the
    condition ended.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smartcard import scard

from ccidbridge.protocol.atr import hexatr
from ccidbridge.spec import ReaderSpec

#: C2: pcsc-lite's PCSCLITE_MAX_READERS_CONTEXTS is 16, PnP included.
MAX_WATCHED = 15

_PRESENT = scard.SCARD_STATE_PRESENT
_NOT_USABLE = scard.SCARD_STATE_MUTE | scard.SCARD_STATE_UNKNOWN


@dataclass(frozen=True, slots=True)
class Attach:
    """Connect to the card in ``reader`` and serve it."""

    reader: str


@dataclass(frozen=True, slots=True)
class Detach:
    """Stop serving the bound card: ``reason`` is one line for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class Poke:
    """The bound reader's state moved without a new card: retry a pending connect."""

    reader: str


@dataclass(frozen=True, slots=True)
class Notice:
    message: str
    level: int = logging.INFO


ChoiceOutput = Attach | Detach | Poke | Notice

#: A reader's (event state, ATR) as SCardGetStatusChange reports it.
ReaderStates = Mapping[str, tuple[int, bytes]]


def reader_matches(spec: ReaderSpec, name: str) -> bool:
    """C1."""
    if spec.name is not None:
        return name == spec.name
    if spec.match is not None:
        return fnmatch.fnmatchcase(name, spec.match)
    return True


def atr_matches(atr: bytes, want: bytes | None, mask: bytes | None) -> bool:
    """``<reader atr= atr-mask=>``: exact, or equal under the mask (same length)."""
    if want is None:
        return True
    if len(atr) != len(want):
        return False
    if mask is None:
        return atr == want
    return all((a & m) == (w & m) for a, w, m in zip(atr, want, mask, strict=True))


def usable(event_state: int) -> bool:
    """C3: a card pcscd can talk to (a MUTE card has no ATR)."""
    return bool(event_state & _PRESENT) and not event_state & _NOT_USABLE


def describe_spec(spec: ReaderSpec) -> str:
    if spec.name is not None:
        return f"reader {spec.name!r}"
    if spec.match is not None:
        return f"a reader matching {spec.match!r}"
    return "any reader"


class ReaderChoice:
    """One served card's choice of reader (see the module docstring)."""

    def __init__(self, spec: ReaderSpec) -> None:
        self.spec = spec
        #: the reader whose card was attached, and its event state then
        self.bound: str | None = None
        self.bound_state = 0
        self._said: set[str] = set()
        self._out: list[ChoiceOutput] = []

    # -- inputs ----------------------------------------------------------------------

    def watched(self, readers: Sequence[str]) -> list[str]:
        """The readers worth a GetStatusChange slot (C1, C2)."""
        accepted = [r for r in readers if reader_matches(self.spec, r)]
        if len(accepted) > MAX_WATCHED:
            self._once(
                "too-many",
                f"{len(accepted)} readers match; PC/SC watches at most {MAX_WATCHED} at once, "
                f"so only the first {MAX_WATCHED} are used (name one with <reader name=...>)",
                logging.WARNING,
            )
            accepted = accepted[:MAX_WATCHED]
        return accepted

    def evaluate(self, readers: Sequence[str], states: ReaderStates) -> list[ChoiceOutput]:
        """The monitor's current view: keep the bound card, or choose one (C3, C4)."""
        bound = self.bound
        if bound is not None:
            event = states.get(bound, (0, b""))[0] if bound in readers else None
            if event is None or event & scard.SCARD_STATE_UNKNOWN:
                self._unbind("reader gone")
            elif not usable(event):
                self._unbind("card removed")
            elif event >> 16 != self.bound_state >> 16:
                self._unbind("card replaced")
            else:
                if event != self.bound_state:
                    self.bound_state = event
                    self._out.append(Poke(bound))
                return self._take()
        self._choose(readers, states)
        return self._take()

    def service_down(self) -> list[ChoiceOutput]:
        """pcscd went away: every context is dead, the card is no longer bound."""
        if self.bound is not None:
            self._unbind("pcscd stopped")
        self._once("down", "pcscd is not running; waiting", logging.WARNING)
        return self._take()

    def service_up(self) -> list[ChoiceOutput]:
        if self._forget("down"):
            self._out.append(Notice("pcscd is running again"))
        return self._take()

    def notice_once(self, key: str, message: str, level: int) -> list[ChoiceOutput]:
        """A condition the monitor found (C5)."""
        self._once(key, message, level)
        return self._take()

    # -- internals -------------------------------------------------------------------

    def _unbind(self, reason: str) -> None:
        self._out.append(Detach(reason))
        self.bound = None

    def _choose(self, readers: Sequence[str], states: ReaderStates) -> None:
        spec = self.spec
        candidates = [r for r in self.watched(readers) if r in readers]
        if not candidates:
            what = describe_spec(spec) if (spec.name or spec.match) else "any PC/SC reader"
            self._once("missing", f"{what} not found; waiting", logging.WARNING)
            return
        if self._forget("missing"):
            self._out.append(Notice(f"found {', '.join(candidates)}"))
        for reader in candidates:
            event, atr = states.get(reader, (0, b""))
            if not usable(event):
                continue
            if not atr_matches(atr, spec.atr, spec.atr_mask):
                self._once(
                    f"atr:{reader}:{atr.hex()}",
                    f"{reader}: card ATR {hexatr(atr)} does not match the configured atr=; "
                    "not serving it",
                    logging.WARNING,
                )
                continue
            self._forget("nocard")
            self.bound, self.bound_state = reader, event
            self._out.append(Attach(reader))
            return
        if states:
            self._once("nocard", f"no card in {describe_spec(spec)}; waiting", logging.INFO)

    def _once(self, key: str, message: str, level: int) -> None:
        if key not in self._said:
            self._said.add(key)
            self._out.append(Notice(message, level))

    def _forget(self, key: str) -> bool:
        if key in self._said:
            self._said.discard(key)
            return True
        return False

    def _take(self) -> list[ChoiceOutput]:
        out, self._out = self._out, []
        return out
