"""``ccidbridge attach``: lend a running VM the config's card(s), then take them back.

The flow (rules A1-A4 in :mod:`ccidbridge.lifecycle.plan`):

1. checks that change nothing: the domain runs, QEMU has ``usb-ccid`` and
   ``ccid-card-passthru``, nothing of ccidbridge's is attached already, no
   other program listens on the card's socket, pcscd lists a reader with the
   card;
2. the runtime's :class:`Service` starts (exactly what ``run`` serves), and for
   the cards where the bridge listens, attach waits until it does (QEMU dials
   as soon as its chardev exists);
3. reader, chardev and card are added through the monitor; any failure
   removes what was added (A2) and stops the bridge;
4. on SIGINT/SIGTERM the Service tells QEMU the card is gone (CardRemove,
   ReaderRemove), then the devices are removed -- to the guest, a USB reader
   unplugged -- and the chardevs after them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Protocol

from ccidbridge.config import Config
from ccidbridge.config.serving import label
from ccidbridge.lifecycle import plan
from ccidbridge.lifecycle.monitor import Monitor, MonitorError, QmpSocket, VirshMonitor, virsh_error
from ccidbridge.lifecycle.sockets import in_use, now_listening, socket_file
from ccidbridge.spec import ServedCard

log = logging.getLogger("ccidbridge.attach")

#: How long a removed device may take to disappear from QEMU (USB unplug is
#: immediate; the bound only guards against a wedged QEMU).
REMOVE_TIMEOUT = 10.0
#: How long attach waits for the bridge to listen before QEMU may dial it.
LISTEN_TIMEOUT = 10.0
TAINT_NOTE = (
    "libvirt 9.0 cannot hot-plug a ccid controller or a smartcard (docs/lifecycle.md#H1): "
    "adding them through QEMU's monitor; libvirt marks the domain tainted "
    "(\"custom monitor control commands issued\")"
)


class AttachError(Exception):
    """Attach or detach cannot go on; ``str()`` says what is wrong and what to do."""


def open_monitor(domain: str | None, uri: str, qmp: str | None) -> Monitor:
    """The monitor of the running domain (through libvirt) or of ``--qmp PATH``."""
    if qmp is not None:
        try:
            return QmpSocket(qmp)
        except MonitorError as exc:
            raise AttachError(f"{exc}: start QEMU with -qmp unix:{qmp},server=on,wait=off") \
                from None
    assert domain is not None
    vm = VirshMonitor(domain, uri)
    try:
        state = vm.virsh("domstate", domain)
    except MonitorError as exc:
        raise AttachError(str(exc)) from None
    if state.returncode != 0:
        raise AttachError(f"{virsh_error(state.stderr)} (on {uri}): `virsh -c {uri} list "
                          "--all` lists the domains")
    if state.stdout.strip() != "running":
        raise AttachError(
            f"domain {domain} is not running ({state.stdout.strip()}): start it first "
            f"(`virsh -c {uri} start {domain}`), or put the card in its XML for good "
            "(`ccidbridge libvirt CONFIG`, docs/lifecycle.md)")
    return vm


def check_devices(mon: Monitor) -> None:
    """QEMU has both devices, asked before anything is added."""
    for typename in ("usb-ccid", "ccid-card-passthru"):
        try:
            mon.execute("device-list-properties", {"typename": typename})
        except MonitorError:
            raise AttachError(
                f"{mon.where}: this QEMU has no {typename} device; it needs usb-ccid and "
                "ccid-card-passthru (Debian's qemu-system-x86 has both; `ccidbridge doctor` "
                "shows what QEMU has)") from None


def reconnect_ms(mon: Monitor) -> bool:
    """QEMU 9.2 renamed the chardev's ``reconnect`` to ``reconnect-ms`` (as qemu_argv)."""
    q = mon.execute("query-version")["qemu"]
    return bool((q["major"], q["minor"]) >= (9, 2))


def our_objects(mon: Monitor) -> plan.Found:
    devices = [c["name"] for c in mon.execute("qom-list", {"path": "/machine/peripheral"})]
    chardevs = [c["label"] for c in mon.execute("query-chardev")]
    return plan.find(devices, chardevs)


def pid_alive(pid: int) -> bool:
    """A live ccidbridge process with this pid (a reused pid does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ccidbridge" in f.read()
    except OSError:
        return False


def check_not_attached(mon: Monitor, found: plan.Found) -> None:
    if not found.cards:
        return
    pids = sorted({pid for _, pid in found.owners()})
    alive = [p for p in pids if pid_alive(p)]
    if alive:
        raise AttachError(
            f"{mon.where} already has a card attached by ccidbridge (process "
            f"{', '.join(map(str, alive))}): one attach per VM; stop that one first "
            "(SIGTERM detaches)")
    raise AttachError(
        f"{mon.where} still has the devices of an attach whose process is gone "
        f"(pid {', '.join(map(str, pids))}): remove them with `ccidbridge detach`")


def check_sockets(cards: list[ServedCard]) -> None:
    for card in cards:
        if in_use(card.endpoint):
            raise AttachError(
                f"{card.label}: {card.endpoint.describe()} is in use: another program "
                "listens there (another `ccidbridge run` or attach?); stop it or give this "
                "config another socket")


def check_cards(cards: list[ServedCard]) -> None:
    """Each card's reader is there and holds a card (the bridge would wait for one)."""
    try:
        from ccidbridge.card.choice import atr_matches, describe_spec, reader_matches
        from ccidbridge.card.listing import PcscUnavailable, reader_infos
    except ImportError as exc:
        raise AttachError(f"pyscard is not usable: {exc}") from None
    try:
        readers = reader_infos()
    except PcscUnavailable as exc:
        raise AttachError(f"{exc}: start pcscd (`systemctl start pcscd.socket`)") from None
    for card in cards:
        spec = card.reader
        matching = [r for r in readers if reader_matches(spec, r.name)]
        with_card = [r for r in matching if r.card_present and r.atr is not None
                     and atr_matches(r.atr, spec.atr, spec.atr_mask)]
        if with_card:
            continue
        names = ", ".join(repr(r.name) for r in readers) or "none"
        what = "no card (with the ATR the config asks for) in" if matching else "no"
        raise AttachError(
            f"{card.label}: card not found: {what} {describe_spec(spec)} (readers: {names}); "
            "insert the card, or fix <reader> (`ccidbridge readers` lists them)")


def reconnects(config: Config, cards: list[ServedCard]) -> list[int | None]:
    """The config's ``<reconnect timeout=>`` of each served card (A4)."""
    by_label: dict[str, int | None] = {}
    for placed in config.layout.cards:
        chardev = placed.card.chardev
        src = chardev.source if chardev is not None else None
        rc = src.reconnect if src is not None else None
        by_label[label(config.path, placed)] = (rc.timeout if rc.enabled else 0) if rc else None
    return [by_label.get(card.label) for card in cards]


def remove(mon: Monitor, cards: set[plan.CardIds], timeout: float = REMOVE_TIMEOUT) -> list[str]:
    """Unplug our readers and cards, wait until QEMU dropped them, then drop the chardevs.

    Returns the problems (empty when everything is gone).  QEMU refuses to
    remove a chardev a device still uses, hence the wait.
    """
    problems: list[str] = []
    found = our_objects(mon)
    for cid in sorted(cards, key=lambda c: c.number):
        roles = found.devices.get(cid, set())
        for role in ("ccid", "card"):  # unplugging the reader takes its card along
            if role in roles:
                try:
                    mon.execute("device_del", {"id": cid.of(role)})
                except MonitorError as exc:
                    if "not found" not in str(exc):
                        problems.append(str(exc))
                break
    deadline = time.monotonic() + timeout
    while True:
        left = {c for c in cards if our_objects(mon).devices.get(c)}
        if not left:
            break
        if time.monotonic() > deadline:
            problems.append(f"{mon.where}: QEMU did not remove "
                            f"{', '.join(sorted(c.ccid for c in left))} in {timeout:g} s")
            break
        for cid in left:  # a card left behind (reader gone first): remove it by itself
            if our_objects(mon).devices.get(cid) == {"card"}:
                with contextlib.suppress(MonitorError):
                    mon.execute("device_del", {"id": cid.card})
        time.sleep(0.05)
    for cid in cards:
        # The card lets go of its chardev when QEMU finalizes it, a moment after
        # it left the QOM tree: until then chardev-remove says "is busy"
        # (docs/lifecycle.md#H4).
        while cid in our_objects(mon).chardevs:
            try:
                mon.execute("chardev-remove", {"id": cid.char})
            except MonitorError as exc:
                if "is busy" not in str(exc) or time.monotonic() > deadline:
                    problems.append(str(exc))
                    break
                time.sleep(0.05)
    return problems


def _undo(mon: Monitor, applied: list[plan.Step]) -> None:
    cards = set()
    for step in applied:
        parsed = plan.parse_id(step.creates)
        assert parsed is not None
        cards.add(parsed[0])
    for problem in remove(mon, cards):
        log.error("detach: %s", problem)


def _wait_listening(cards: list[ServedCard], stopped: threading.Event,
                    before: list[tuple[int, int] | None]) -> bool:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    for card, old in zip(cards, before, strict=True):
        while card.endpoint.bridge_listens and not now_listening(card.endpoint, old):
            if stopped.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
    return True


class _Attacher(threading.Thread):
    """Adds the devices while the Service runs on the main thread (it owns the signals)."""

    def __init__(self, mon: Monitor, cards: list[ServedCard], steps: list[plan.Step],
                 service: Stoppable, stopped: threading.Event) -> None:
        super().__init__(name="ccidbridge-attach", daemon=True)
        self.mon, self.cards, self.steps = mon, cards, steps
        self.service, self.stopped = service, stopped
        self.before = [socket_file(c.endpoint.path) if c.endpoint.path else None for c in cards]
        self.applied: list[plan.Step] = []
        self.failure: str | None = None

    def run(self) -> None:
        try:
            if not _wait_listening(self.cards, self.stopped, self.before):
                if not self.stopped.is_set():
                    self.failure = "the bridge did not start listening (see the lines above)"
                return
            for step in self.steps:
                if self.stopped.is_set():
                    return
                self.mon.execute(step.command, step.arguments)
                self.applied.append(step)
            log.info("attached %d card(s) to %s: the guest sees the reader(s); SIGINT/SIGTERM "
                     "detaches", len(self.cards), self.mon.where)
        except MonitorError as exc:
            self.failure = plan.explain(str(exc), self.mon.where)
        finally:
            if self.failure is not None:
                log.error("attach failed: %s", self.failure)
                self.service.request_stop()


class Stoppable(Protocol):
    def run(self) -> int: ...
    def request_stop(self) -> None: ...


def serve_attached(mon: Monitor, cards: list[ServedCard], steps: list[plan.Step],
                   service: Stoppable) -> int:
    """Run the Service, attach the devices beside it, serve until a signal, then detach.

    Call on the main thread: the Service takes SIGINT/SIGTERM while it runs; before
    it starts and during the detach, the handlers here keep a signal from cutting
    the process short with devices left in QEMU.
    """
    stopped = threading.Event()
    early = {sig: signal.signal(sig, lambda *_: service.request_stop())
             for sig in (signal.SIGINT, signal.SIGTERM)}
    attacher = _Attacher(mon, cards, steps, service, stopped)
    try:
        attacher.start()
        rc = service.run()
        stopped.set()
        for sig in early:  # a second signal must not cut the detach
            signal.signal(sig, lambda *_: log.warning("still detaching; one moment"))
        attacher.join()  # its current monitor command ends within COMMAND_TIMEOUT
        log.info("detaching from %s", mon.where)
        _undo(mon, attacher.applied)
    finally:
        for sig, handler in early.items():
            signal.signal(sig, handler)
    if attacher.failure is not None:
        return 1
    log.info("detached: the reader is gone from %s", mon.where)
    return rc


def prepare(mon: Monitor, config: Config, cards: list[ServedCard]) -> list[plan.Step]:
    """Every check that changes nothing, then the steps (attach's step 1)."""
    try:
        check_devices(mon)
        check_not_attached(mon, our_objects(mon))
        version_ms = reconnect_ms(mon)
    except MonitorError as exc:
        raise AttachError(plan.explain(str(exc), mon.where)) from None
    check_sockets(cards)
    check_cards(cards)
    card_ids = plan.ids(plan.config_tag(config.path), os.getpid(), len(cards))
    return plan.attach_steps(cards, card_ids, reconnects(config, cards), version_ms)
