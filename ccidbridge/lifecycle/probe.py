"""The probes behind ``ccidbridge doctor``: run the real programs, return frozen facts.

Thin on purpose: what the facts mean is :mod:`ccidbridge.lifecycle.doctor`'s.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess

from lxml import etree

from ccidbridge.lifecycle.doctor import (
    CardNeed,
    Client,
    LibvirtFacts,
    PcscFacts,
    QemuFacts,
    ReaderFacts,
    SocketDir,
)
from ccidbridge.spec import ServedCard, Share

PCSCD = "/usr/sbin/pcscd"
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
TIMEOUT = 20


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` to the end, text output, bounded."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def qemu(binary: str) -> QemuFacts:
    try:
        version = _run([binary, "--version"])
        if version.returncode != 0:
            return QemuFacts(binary, error=(version.stderr or version.stdout).strip()[:200])
        devices = _run([binary, "-nodefaults", "-machine", "none", "-device", "help"])
        props = _run([binary, "-nodefaults", "-machine", "none", "-device", "usb-ccid,help"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return QemuFacts(binary, error=str(exc))
    names = frozenset(re.findall(r'^name "([^"]+)"', devices.stdout, re.MULTILINE))
    options = tuple(m for m in re.findall(r"^\s+([a-z][\w-]*)=", props.stdout, re.MULTILINE))
    first = version.stdout.strip().splitlines()[0] if version.stdout.strip() else "?"
    return QemuFacts(binary, version=first.removeprefix("QEMU emulator "), devices=names,
                     ccid_properties=options if "usb-ccid" in names else ())


def pcscd_version() -> str | None:
    try:
        out = _run([PCSCD, "--version"]).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"pcsc-lite version ([\d.]+?)\.?$", out, re.MULTILINE)
    return m.group(1) if m else None


def pcsc_clients(socket_path: str = PCSCD_SOCKET) -> tuple[tuple[Client, ...] | None, str | None]:
    """The processes with a connection to pcscd's socket (sock_diag through `ss -xp`)."""
    try:
        out = _run(["ss", "-xpH"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"ss: {exc}"
    if out.returncode != 0:
        return None, out.stderr.strip()
    server_peers: set[str] = set()
    rows = []
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        local, inode, peer_inode = f[4], f[5], f[7]
        procs = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        rows.append((inode, procs))
        if local == socket_path:
            server_peers.add(peer_inode)
    clients = {Client(int(pid), name) for inode, procs in rows if inode in server_peers
               for name, pid in procs}
    return tuple(sorted(clients, key=lambda c: c.pid)), None


def pcsc(version: str | None) -> PcscFacts:
    try:
        from smartcard import scard

        from ccidbridge.card.listing import PcscUnavailable, reader_infos
    except ImportError as exc:
        return PcscFacts(False, error=f"pyscard is not usable: {exc}", version=version)
    try:
        infos = reader_infos()
    except PcscUnavailable as exc:
        return PcscFacts(False, error=str(exc), version=version)
    readers = []
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    try:
        for info in infos:
            held = False
            if info.card_present and hr == scard.SCARD_S_SUCCESS:
                rv, handle, _ = scard.SCardConnect(
                    ctx, info.name, scard.SCARD_SHARE_SHARED,
                    scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
                if rv == scard.SCARD_S_SUCCESS:
                    scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
                held = rv & 0xFFFFFFFF == scard.SCARD_E_SHARING_VIOLATION & 0xFFFFFFFF
            readers.append(ReaderFacts(info.name, info.card_present, info.atr, held))
    finally:
        if hr == scard.SCARD_S_SUCCESS:
            scard.SCardReleaseContext(ctx)
    clients, error = pcsc_clients()
    return PcscFacts(True, version=version, readers=tuple(readers), clients=clients,
                     clients_error=error)


def card_needs(cards: list[ServedCard], p: PcscFacts) -> list[CardNeed]:
    from ccidbridge.card.choice import atr_matches, describe_spec, reader_matches

    out = []
    for card in cards:
        spec = card.reader
        matches = tuple(r.name for r in p.readers if reader_matches(spec, r.name))
        atr_ok = tuple(r.name for r in p.readers if r.name in matches and r.card_present
                       and r.atr is not None and atr_matches(r.atr, spec.atr, spec.atr_mask))
        out.append(CardNeed(card.label, describe_spec(spec), matches, atr_ok,
                            spec.share is Share.EXCLUSIVE))
    return out


def socket_dir(card: ServedCard) -> SocketDir | None:
    ep = card.endpoint
    if ep.kind != "unix" or not ep.path:
        return None
    directory = os.path.dirname(ep.path)
    try:
        st = os.stat(directory)
    except OSError:
        return SocketDir(card.label, directory, ep.bridge_listens, exists=False)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return SocketDir(card.label, directory, ep.bridge_listens, True, st.st_uid, st.st_gid,
                     st.st_mode, owner, group, os.access(directory, os.W_OK | os.X_OK))


def libvirt(uri: str, domain: str | None) -> tuple[LibvirtFacts, str | None]:
    """The libvirt facts and, for a domain, its ``<emulator>`` (None without)."""
    try:
        out = _run(["virsh", "-c", uri, "version"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LibvirtFacts(uri, error=f"virsh: {exc}", domain=domain), None
    if out.returncode != 0:
        text = out.stderr.strip().splitlines()
        error = text[-1].removeprefix("error: ") if text else "virsh failed"
        return LibvirtFacts(uri, error=error, domain=domain), None
    lib = re.search(r"Using library: libvirt ([\d.]+)", out.stdout)
    hyp = re.search(r"Running hypervisor: (\S+ [\d.]+)", out.stdout)
    facts = LibvirtFacts(uri, library=lib.group(1) if lib else "?",
                         hypervisor=hyp.group(1) if hyp else None, domain=domain)
    if domain is None:
        return facts, None
    xml = _run(["virsh", "-c", uri, "dumpxml", domain])
    if xml.returncode != 0:
        err = xml.stderr.strip().splitlines()
        return LibvirtFacts(uri, facts.library, facts.hypervisor, domain=domain,
                            domain_error=err[-1].removeprefix("error: ") if err else "?"), None
    root = etree.fromstring(xml.stdout.encode(), etree.XMLParser(resolve_entities=False,
                                                                 no_network=True))
    models = tuple(c.get("model") or "default" for c in root.iterfind(
        "devices/controller[@type='usb']"))
    emulator = root.findtext("devices/emulator")
    return LibvirtFacts(uri, facts.library, facts.hypervisor, domain=domain,
                        usb_models=models), emulator
