"""libvirt 9.0's normalization of the config's devices: indexes, addresses, aliases.

Pure: from ``Devices`` to a ``Layout`` that both renderers read.  The rules
(docs/libvirt-facts.md#L4 .. #L8), all checked against ``virsh define`` +
``dumpxml --inactive`` and ``domxml-to-native`` (tests/test_libvirt_oracle.py):

* A smartcard without an address gets ``controller='0' slot='0'``; a missing
  ``<controller type='ccid' index='0'>`` is added (virDomainDefMaybeAddSmartcardController).
* ccid controllers the config lists are kept in index order; an implicit
  controller comes after them in libvirt 9.0, in index order among them in
  newer libvirt (versions.SORTED_CCID_LIBVIRT, docs/libvirt-facts.md#L32).  USB ports
  are handed out in that order, the
  next free port of the first USB controller for each controller without one
  (virDomainUSBAddressAssign; we assume the domain has no other USB devices).
* Aliases (qemu_alias.c): ``ccid<index>``, ``smartcard<n>``, ``channel<n>``,
  ``virtio-serial<index>``; chardevs are ``char`` + device alias.
* A spicevmc channel without an address gets the next free port on
  virtio-serial controller 0 bus 0, from port 1; the controller is added.
* libvirt 9.0 refuses a second ``<smartcard>``, so each extra card gets a ccid
  controller of its own (the lowest empty one the config lists, else a new
  index) and its chardev and card device go to ``<qemu:commandline>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidbridge.config.model import (
    CcidController,
    Devices,
    Smartcard,
    SpiceChannel,
    UsbAddress,
    VirtioSerialAddress,
)
from ccidbridge.config.versions import OLDEST_LIBVIRT, SORTED_CCID_LIBVIRT, LibvirtVersion


@dataclass(frozen=True)
class PlacedController:
    index: int
    usb: UsbAddress
    line: int = 0  # 0: added by libvirt (or by ccidbridge for an extra card)
    usb_given: bool = False  # the config itself set the USB address

    @property
    def alias(self) -> str:
        return f"ccid{self.index}"


@dataclass(frozen=True)
class PlacedCard:
    card: Smartcard
    number: int  # 0 for libvirt's own <smartcard>, 1.. for the extra cards
    controller: int  # ccid controller index

    @property
    def in_libvirt(self) -> bool:
        """False for the extra cards, which live in <qemu:commandline>."""
        return self.number == 0

    @property
    def alias(self) -> str:
        return f"smartcard{self.number}"

    @property
    def chardev_alias(self) -> str:
        return f"char{self.alias}"

    @property
    def bus(self) -> str:
        return f"ccid{self.controller}.0"


@dataclass(frozen=True)
class PlacedChannel:
    channel: SpiceChannel
    number: int
    address: VirtioSerialAddress

    @property
    def alias(self) -> str:
        return f"channel{self.number}"

    @property
    def chardev_alias(self) -> str:
        return f"char{self.alias}"


@dataclass(frozen=True)
class Layout:
    """The devices as libvirt 9.0 lays them out, plus the extra cards."""

    controllers: tuple[PlacedController, ...]  # listed ones by index, then the added ones
    cards: tuple[PlacedCard, ...]  # cards[0] is libvirt's; the rest are extras
    channels: tuple[PlacedChannel, ...]
    virtio_serial: tuple[int, ...]  # virtio-serial controller indexes the channels need

    @property
    def libvirt_card(self) -> PlacedCard | None:
        return self.cards[0] if self.cards else None

    @property
    def extra_cards(self) -> tuple[PlacedCard, ...]:
        return self.cards[1:]


def usb_bus(bus: int) -> str:
    """The QEMU bus name of USB controller ``bus`` (alias ``usb`` for index 0, else ``usbN``)."""
    return "usb.0" if bus == 0 else f"usb{bus}.0"


def _controller_indexes(controllers: tuple[CcidController, ...]) -> list[tuple[int, int]]:
    """``(index, line)`` of the listed controllers; a missing index takes the lowest free one."""
    used = {c.index for c in controllers if c.index is not None}
    out: list[tuple[int, int]] = []
    lowest = 0  # the lowest index that may be free: only grows, as ``used`` does
    for ctl in controllers:
        index = ctl.index
        if index is None:
            while lowest in used:
                lowest += 1
            index = lowest
            used.add(index)
        out.append((index, ctl.line))
    return out


def layout(devices: Devices, libvirt: LibvirtVersion = OLDEST_LIBVIRT) -> Layout:
    """Place every device as ``libvirt`` would (see the module docstring)."""
    listed = sorted(
        zip(_controller_indexes(devices.controllers), devices.controllers, strict=True),
        key=lambda item: item[0][0],
    )
    explicit_usb = {idx: ctl.usb for (idx, _), ctl in listed if ctl.usb is not None}
    order: list[tuple[int, int]] = [(idx, line) for (idx, line), _ in listed]
    indexes = {idx for idx, _ in order}

    cards: list[PlacedCard] = []
    occupied: set[int] = set()
    listed_indexes = [idx for idx, _ in order]  # sorted; the only ones that can be free
    next_listed = 0  # listed_indexes[:next_listed] are all occupied
    highest = max(indexes, default=-1)
    for number, card in enumerate(devices.smartcards):
        if number == 0:
            controller = card.address.controller if card.address else 0
        else:
            while next_listed < len(listed_indexes) and listed_indexes[next_listed] in occupied:
                next_listed += 1
            free = next_listed < len(listed_indexes)
            controller = listed_indexes[next_listed] if free else highest + 1
        if controller not in indexes:
            order.append((controller, 0))
            indexes.add(controller)
            highest = max(highest, controller)
        occupied.add(controller)
        cards.append(PlacedCard(card=card, number=number, controller=controller))

    if libvirt >= SORTED_CCID_LIBVIRT:
        order.sort()
    taken = {u.port for u in explicit_usb.values() if u.bus == 0}
    placed: list[PlacedController] = []
    next_port = 1
    for idx, line in order:
        usb = explicit_usb.get(idx)
        given = usb is not None
        if usb is None:
            while str(next_port) in taken:
                next_port += 1
            usb = UsbAddress(bus=0, port=str(next_port))
            taken.add(usb.port)
        placed.append(PlacedController(index=idx, usb=usb, line=line, usb_given=given))

    vs_taken = {
        (c.address.controller, c.address.bus, c.address.port)
        for c in devices.channels
        if c.address is not None
    }
    channels: list[PlacedChannel] = []
    port = 1  # the lowest free port on controller 0 bus 0 only grows, as vs_taken does
    for number, channel in enumerate(devices.channels):
        address = channel.address
        if address is None:
            while (0, 0, port) in vs_taken:
                port += 1
            address = VirtioSerialAddress(controller=0, bus=0, port=port)
            vs_taken.add((0, 0, port))
        channels.append(PlacedChannel(channel=channel, number=number, address=address))
    virtio_serial = tuple(sorted({c.address.controller for c in channels}))
    return Layout(tuple(placed), tuple(cards), tuple(channels), virtio_serial)
