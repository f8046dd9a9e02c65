"""A loaded config: its devices, their layout and what ``run`` serves, all resolved once."""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.config.layout import Layout
from ccidbridge.config.model import Devices
from ccidbridge.spec import ServedCard


@dataclass(frozen=True)
class Config:
    """A loaded ccidbridge config (see ``ccidbridge.config.load``)."""

    path: str
    devices: Devices
    layout: Layout  # the devices as libvirt 9.0 places them (config/layout.py)
    cards: tuple[ServedCard, ...]  # what ``run`` serves
    skipped: tuple[tuple[str, str], ...]  # (label, reason) of every device it does not
    refused: tuple[str, ...] = ()  # FILE:LINE messages: cards refused for safety (exit 2)

    def served_cards(self) -> list[ServedCard]:
        """The passthrough cards ``ccidbridge run`` serves, one per reachable socket chardev."""
        return list(self.cards)

    def unserved(self) -> list[tuple[str, str]]:
        """``(label, reason)`` for every device the bridge does not serve."""
        return list(self.skipped)
