"""``ccidbridge doctor``: what each probed fact means and how to fix it (pure).

The probes (:mod:`ccidbridge.lifecycle.probe`) collect frozen facts; the
functions here turn them into :class:`Check` lines, one per check, each with
its fix.  Nothing here does IO, so every rule is unit-tested with made-up
facts (tests/test_doctor.py) and the probes with the real programs.

A check that fails means ``run`` would not serve the config into a VM (exit
status 1); a warning is worth knowing but does not stop it (no card yet,
other programs using PC/SC).  An invalid config exits 2, as everywhere.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from enum import Enum


class Status(str, Enum):  # noqa: UP042
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    text: str
    fix: str = ""

    def line(self) -> str:
        head = f"[{self.status.value:^4}] {self.name}: {self.text}"
        return f"{head}\n       fix: {self.fix}" if self.fix else head


NEEDED_DEVICES = ("usb-ccid", "ccid-card-passthru")


@dataclass(frozen=True)
class QemuFacts:
    binary: str
    version: str | None = None  # first line of --version; None: did not run
    error: str | None = None
    devices: frozenset[str] = frozenset()
    ccid_properties: tuple[str, ...] = ()  # `-device usb-ccid,help`


@dataclass(frozen=True)
class ReaderFacts:
    name: str
    card_present: bool
    atr: bytes | None = None
    held_exclusively: bool = False  # a SHARED connect got SCARD_E_SHARING_VIOLATION


@dataclass(frozen=True)
class Client:
    pid: int
    name: str


@dataclass(frozen=True)
class PcscFacts:
    reachable: bool
    error: str | None = None
    version: str | None = None  # "1.9.9" from `pcscd --version`
    readers: tuple[ReaderFacts, ...] = ()
    clients: tuple[Client, ...] | None = None  # None: could not list them
    clients_error: str | None = None


@dataclass(frozen=True)
class CardNeed:
    """What one served card needs on the host (from the config)."""

    label: str
    reader: str  # "reader 'X'" / "a reader matching 'X*'" / "any reader"
    matches: tuple[str, ...]  # reader names the spec accepts
    atr_ok: tuple[str, ...]  # of those, the ones whose card's ATR the spec accepts
    exclusive: bool


@dataclass(frozen=True)
class SocketDir:
    label: str
    path: str  # the directory
    bridge_listens: bool
    exists: bool
    uid: int = 0
    gid: int = 0
    mode: int = 0
    owner: str = ""
    group: str = ""
    writable: bool = False  # by this process (the bridge will run like it)


@dataclass(frozen=True)
class LibvirtFacts:
    uri: str
    library: str | None = None
    hypervisor: str | None = None
    error: str | None = None
    domain: str | None = None
    domain_error: str | None = None
    usb_models: tuple[str, ...] | None = None  # the domain's <controller type='usb'> models


#: Programs known to hold PC/SC cards, and how to make them let go.
KNOWN_HOLDERS = {
    "scdaemon": "GnuPG's scdaemon keeps the card: `gpgconf --kill scdaemon`, or put "
                "`pcsc-shared` (or `disable-ccid`) in ~/.gnupg/scdaemon.conf",
    "gsd-smartcard": "GNOME's smartcard plugin watches every card: `systemctl --user mask "
                     "org.gnome.SettingsDaemon.Smartcard.target` (or stop gsd-smartcard)",
    "firefox": "the browser loaded a PKCS#11 module (OpenSC/p11-kit): close it or unload "
               "the module in its security devices",
    "firefox-esr": "the browser loaded a PKCS#11 module: close it or unload the module",
    "chrome": "the browser uses the card through p11-kit/NSS: close it",
    "chromium": "the browser uses the card through p11-kit/NSS: close it",
    "pcscd": "",
}


def check_qemu(q: QemuFacts) -> list[Check]:
    if q.version is None:
        return [Check("qemu", Status.FAIL, f"{q.binary} does not run: {q.error}",
                      "install QEMU (Debian: qemu-system-x86) or name it with --qemu PATH")]
    missing = [d for d in NEEDED_DEVICES if d not in q.devices]
    if missing:
        return [Check("qemu", Status.FAIL,
                      f"{q.binary} ({q.version}) lacks {' and '.join(missing)}",
                      "use a QEMU built with CONFIG_USB_SMARTCARD (libcacard); Debian's "
                      "qemu-system-x86 has usb-ccid and ccid-card-passthru")]
    props = ", ".join(q.ccid_properties) or "none listed"
    return [Check("qemu", Status.OK, f"{q.binary} ({q.version}) has usb-ccid and "
                  f"ccid-card-passthru; usb-ccid options: {props}")]


def check_pcscd(p: PcscFacts) -> list[Check]:
    version = f"pcsc-lite {p.version}" if p.version else "pcscd"
    if not p.reachable:
        return [Check("pcscd", Status.FAIL, f"{version} not reachable: {p.error}",
                      "start it: `systemctl start pcscd.socket` (or `pcscd` by hand)")]
    names = ", ".join(f"'{r.name}'" + (" (card)" if r.card_present else " (empty)")
                      for r in p.readers) or "no readers"
    return [Check("pcscd", Status.OK, f"{version} reachable; readers: {names}")]


def _holders(clients: tuple[Client, ...] | None) -> str:
    if not clients:
        return "unknown"
    return ", ".join(f"{c.name} (pid {c.pid})" for c in clients)


def check_cards(needs: list[CardNeed], p: PcscFacts, me: int) -> list[Check]:
    if not p.reachable:
        return []
    out = []
    by_name = {r.name: r for r in p.readers}
    others = tuple(c for c in (p.clients or ()) if c.pid != me and c.name != "pcscd")
    for need in needs:
        if not need.matches:
            out.append(Check(f"card {need.label}", Status.FAIL,
                             f"no {need.reader} among pcscd's readers",
                             "plug the reader in, or fix <reader> in the config "
                             "(`ccidbridge readers` lists the names)"))
            continue
        with_card = [n for n in need.matches if by_name[n].card_present]
        if not with_card:
            out.append(Check(f"card {need.label}", Status.WARN,
                             f"{need.reader} has no card yet ({', '.join(need.matches)})",
                             "insert the card; run serves it as soon as it is there"))
            continue
        if not need.atr_ok:
            out.append(Check(f"card {need.label}", Status.WARN,
                             f"the card in {', '.join(with_card)} has another ATR than "
                             "<reader atr=> asks for",
                             "insert the right card or fix atr=/atr-mask= "
                             "(`ccidbridge readers` prints the ATR)"))
            continue
        held = [n for n in need.atr_ok if by_name[n].held_exclusively]
        if held:
            out.append(Check(f"card {need.label}", Status.FAIL,
                             f"the card in '{held[0]}' is held exclusively by another program "
                             f"(PC/SC clients: {_holders(others)})",
                             "make that program let go of the card (see the client lines)"))
            continue
        out.append(Check(f"card {need.label}", Status.OK,
                         f"card in '{need.atr_ok[0]}' can be served"
                         + (" exclusively" if need.exclusive else " shared")))
    return out


def check_clients(p: PcscFacts, me: int) -> list[Check]:
    if not p.reachable:
        return []
    if p.clients is None:
        return [Check("pcsc clients", Status.WARN,
                      f"cannot list the programs connected to pcscd: {p.clients_error}",
                      "install iproute2 (ss)")]
    others = [c for c in p.clients if c.pid != me and c.name != "pcscd"]
    if not others:
        return [Check("pcsc clients", Status.OK, "no other program is connected to pcscd")]
    out = []
    for c in others:
        fix = KNOWN_HOLDERS.get(c.name, "if it holds the card the bridge needs, stop it")
        out.append(Check("pcsc clients", Status.WARN,
                         f"{c.name} (pid {c.pid}) is connected to pcscd", fix))
    return out


def check_socket_dir(d: SocketDir) -> Check:
    name = f"socket dir {d.label}"
    if not d.exists:
        return Check(name, Status.FAIL, f"{d.path} does not exist",
                     f"create it: `install -d -m 0750 {d.path}` (the systemd unit's "
                     "RuntimeDirectory creates /run/ccidbridge)")
    desc = f"{d.path} {d.owner}:{d.group} {stat.filemode(d.mode)[1:]} ({d.mode & 0o7777:04o})"
    if d.mode & stat.S_IWOTH and not d.mode & stat.S_ISVTX:
        return Check(name, Status.WARN, f"{desc} is writable by everyone",
                     f"`chmod o-w {d.path}`: anyone could replace the card's socket")
    if d.bridge_listens and not d.writable:
        return Check(name, Status.FAIL, f"{desc} is not writable by this user; the bridge "
                     "creates its socket there", f"run the bridge as {d.owner} or "
                     f"`chown` {d.path} to its user")
    who = "the bridge creates the socket" if d.bridge_listens else "QEMU creates the socket"
    return Check(name, Status.OK, f"{desc}; {who}")


def check_libvirt(v: LibvirtFacts) -> list[Check]:
    if v.library is None:
        status = Status.FAIL if v.domain else Status.WARN
        return [Check("libvirt", status, f"{v.uri}: {v.error}",
                      "start libvirtd or give the URI with -c")]
    out = [Check("libvirt", Status.OK, f"{v.uri}: libvirt {v.library}"
                 + (f", hypervisor {v.hypervisor}" if v.hypervisor else ""))]
    if v.domain is None:
        return out
    if v.domain_error is not None:
        out.append(Check(f"domain {v.domain}", Status.FAIL, v.domain_error,
                         f"`virsh -c {v.uri} list --all` lists the domains"))
    elif not v.usb_models or all(m == "none" for m in v.usb_models):
        what = "has USB disabled (model='none')" if v.usb_models else "has no USB controller"
        out.append(Check(f"domain {v.domain}", Status.FAIL, what,
                         "add <controller type='usb' model='qemu-xhci'/> to the domain "
                         "(`virsh edit`), then restart it"))
    else:
        out.append(Check(f"domain {v.domain}", Status.OK,
                         f"USB controller ({', '.join(m for m in v.usb_models if m != 'none')})"
                         " for the card's reader"))
    return out


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    @property
    def serves(self) -> bool:
        return all(c.status is not Status.FAIL for c in self.checks)

    def exit_status(self) -> int:
        return 0 if self.serves else 1
