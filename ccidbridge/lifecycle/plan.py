"""What ``attach`` adds to a running QEMU and how it takes it away again (pure).

For each served card, three QEMU objects (the same ones libvirt's
``<controller type='ccid'>`` + ``<smartcard mode='passthrough'>`` start a
domain with, docs/libvirt-facts.md): a ``usb-ccid`` reader on the guest's USB bus,
a socket chardev, and a ``ccid-card-passthru`` card on the reader's bus.

Rules (each stated here once, enforced where tagged):

* A1 Every id starts with ``ccidbridge-`` and carries the config's tag and the
  attaching process's pid (``ccidbridge-<tag>-<pid>-<n>-ccid|char|card``), so
  ``detach`` finds what an attach added from QEMU's state alone, even after the
  attaching process was SIGKILLed (:func:`ids`, :func:`parse_id`; docs/lifecycle.md#H2).
* A2 Objects are added reader, chardev, card, and removed in the reverse
  order; every step that succeeded has an undo, so a failure half-way leaves
  nothing behind (:func:`attach_steps`).
* A3 The reader goes on QEMU's default USB bus (no ``bus``/``port``: QEMU
  picks a free port, as libvirt does for a controller without an address);
  a config's own USB port is for the domain XML, where libvirt manages ports.
* A4 The chardev keeps the config's direction: ``mode='bind'`` makes QEMU
  listen (``server``, ``wait=off``), ``mode='connect'`` makes QEMU dial the
  bridge, with the config's reconnect delay or 1 s, so QEMU dials again
  after a bridge restart (``reconnect-ms`` from QEMU 9.2, as qemu_argv does).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any

from ccidbridge.spec import Endpoint, ServedCard

PREFIX = "ccidbridge-"
ROLES = ("ccid", "char", "card")
_ID = re.compile(r"^ccidbridge-([0-9a-f]{8})-(\d+)-(\d+)-(ccid|char|card)$")
#: QEMU's reconnect for a chardev that dials the bridge, when the config has none.
DEFAULT_RECONNECT = 1


def config_tag(path: str) -> str:
    """8 hex digits naming a config file (its absolute path) in QEMU ids."""
    return hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class CardIds:
    tag: str
    pid: int
    number: int

    def of(self, role: str) -> str:
        return f"{PREFIX}{self.tag}-{self.pid}-{self.number}-{role}"

    @property
    def ccid(self) -> str:
        return self.of("ccid")

    @property
    def char(self) -> str:
        return self.of("char")

    @property
    def card(self) -> str:
        return self.of("card")


def ids(tag: str, pid: int, count: int) -> list[CardIds]:  # A1
    return [CardIds(tag, pid, n) for n in range(count)]


def parse_id(name: str) -> tuple[CardIds, str] | None:  # A1
    """``(CardIds, role)`` for one of our ids, None for any other."""
    m = _ID.match(name)
    if m is None:
        return None
    return CardIds(m.group(1), int(m.group(2)), int(m.group(3))), m.group(4)


@dataclass(frozen=True)
class Step:
    """One QMP command, what undoes it, and the id it creates."""

    command: str
    arguments: dict[str, Any]
    undo: tuple[str, dict[str, Any]]
    creates: str
    kind: str  # "device" (removal awaited) or "chardev"


def chardev_backend(ep: Endpoint, reconnect: int | None, reconnect_ms: bool) -> dict[str, Any]:
    """QMP ``chardev-add`` backend for the card's socket (A4)."""
    if ep.kind == "unix":
        addr: dict[str, Any] = {"type": "unix", "data": {"path": ep.path}}
    else:
        addr = {"type": "inet", "data": {"host": ep.host, "port": str(ep.port)}}
    data: dict[str, Any] = {"addr": addr}
    if ep.bridge_listens:  # QEMU dials the bridge
        data["server"] = False
        delay = DEFAULT_RECONNECT if reconnect is None else reconnect
        data["reconnect-ms" if reconnect_ms else "reconnect"] = (
            delay * 1000 if reconnect_ms else delay)
    else:
        data["server"] = True
        data["wait"] = False
    return {"type": "socket", "data": data}


def attach_steps(cards: list[ServedCard], card_ids: list[CardIds],
                 reconnects: list[int | None], reconnect_ms: bool) -> list[Step]:
    """Every card's reader, chardev and card device, in order (A2, A3)."""
    steps: list[Step] = []
    for card, cid, reconnect in zip(cards, card_ids, reconnects, strict=True):
        steps.append(Step("device_add", {"driver": "usb-ccid", "id": cid.ccid},
                          ("device_del", {"id": cid.ccid}), cid.ccid, "device"))
        steps.append(Step("chardev-add",
                          {"id": cid.char,
                           "backend": chardev_backend(card.endpoint, reconnect, reconnect_ms)},
                          ("chardev-remove", {"id": cid.char}), cid.char, "chardev"))
        steps.append(Step("device_add", {"driver": "ccid-card-passthru", "id": cid.card,
                                         "chardev": cid.char, "bus": f"{cid.ccid}.0"},
                          ("device_del", {"id": cid.card}), cid.card, "device"))
    return steps


@dataclass(frozen=True)
class Found:
    """Our objects in one QEMU, grouped by card."""

    devices: dict[CardIds, set[str]]  # card -> roles present among devices
    chardevs: set[CardIds]

    @property
    def cards(self) -> set[CardIds]:
        return set(self.devices) | self.chardevs

    def owners(self) -> set[tuple[str, int]]:
        return {(c.tag, c.pid) for c in self.cards}


def find(device_ids: list[str], chardev_ids: list[str]) -> Found:  # A1
    devices: dict[CardIds, set[str]] = {}
    chardevs: set[CardIds] = set()
    for name in device_ids:
        parsed = parse_id(name)
        if parsed and parsed[1] != "char":
            devices.setdefault(parsed[0], set()).add(parsed[1])
    for name in chardev_ids:
        parsed = parse_id(name)
        if parsed and parsed[1] == "char":
            chardevs.add(parsed[0])
    return Found(devices, chardevs)


# What QEMU's refusals mean for the user (matched on QEMU's own wording, which
# reaches us unchanged through QMP and, inside virsh's message, through libvirt).
_EXPLAIN = (
    ("No 'usb-bus' bus found",
     "{where} has no USB controller: add one to the domain "
     "(<controller type='usb' model='qemu-xhci'/>, then restart it) or start QEMU with "
     "-device qemu-xhci"),
    ("no free ports",
     "{where}: the USB controller has no free port for the reader: use a qemu-xhci "
     "controller (more ports) or unplug another USB device"),
    ("not a valid device model name",
     "{where}: this QEMU lacks a smartcard device; it needs usb-ccid and ccid-card-passthru "
     "(Debian's qemu-system-x86 has both; `ccidbridge doctor` shows what QEMU has)"),
    ("Address already in use",
     "{where}: the card's socket is in use by another program; stop it (another "
     "`ccidbridge run` or attach?) or give this config another socket"),
    ("Connection refused",
     "{where}: QEMU could not reach the bridge's socket (a bridge must listen there for "
     "<source mode='connect'>)"),
)


def explain(message: str, where: str) -> str:
    """A QEMU error as the user needs it: what is wrong and what to do."""
    for needle, text in _EXPLAIN:
        if needle in message:
            return text.format(where=where) + f" [{message}]"
    return f"{where}: {message}"
