"""``ccidbridge doctor [CONFIG] [--domain NAME]``: one line per check, each with its fix;
the exit status says whether ``run`` would serve the config (ccidbridge.lifecycle.doctor)."""

from __future__ import annotations

import argparse
import os

from ccidbridge.commands import EXIT_CONFIG
from ccidbridge.commands.attach import DEFAULT_URI

DEFAULT_QEMU = "qemu-system-x86_64"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor", help="check QEMU, pcscd, the readers, socket dirs and libvirt for a config",
        description="Check everything a config needs, one line per check with the fix: "
        "QEMU's smartcard devices, pcscd, the readers and cards, other programs holding "
        "them, the socket directories, libvirt and the domain's USB controller.  Exit "
        "status 0: `run` would serve the config; 1: it would not; 2: invalid config.",
    )
    p.add_argument("config", metavar="CONFIG", nargs="?")
    p.add_argument("--domain", metavar="NAME", help="also check this libvirt domain")
    p.add_argument("-c", "--connect", dest="uri", default=DEFAULT_URI, metavar="URI")
    p.add_argument("--qemu", metavar="PATH",
                   help=f"the QEMU binary (default: the domain's emulator, else "
                   f"$CCIDBRIDGE_QEMU, else {DEFAULT_QEMU})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ccidbridge.config import ConfigError, load
    from ccidbridge.lifecycle import doctor, probe
    from ccidbridge.lifecycle.doctor import Check, Status

    report = doctor.Report()
    cards = []
    if args.config is not None:
        try:
            config = load(args.config)
        except ConfigError as exc:
            print(Check("config", Status.FAIL, str(exc), "fix the line it names "
                        "(`ccidbridge check CONFIG`)").line())
            return EXIT_CONFIG
        cards = config.served_cards()
        if cards:
            report.add(Check("config", Status.OK, f"{args.config}: run serves {len(cards)} "
                             "card(s)"))
        else:
            report.add(Check("config", Status.FAIL, f"{args.config}: nothing run can serve",
                             "a passthrough <smartcard> on a tcp or unix socket "
                             "(`ccidbridge check CONFIG` says why each is left out)"))
    facts, emulator = probe.libvirt(args.uri, args.domain)
    qemu = args.qemu or emulator or os.environ.get("CCIDBRIDGE_QEMU") or DEFAULT_QEMU
    report.add(*doctor.check_qemu(probe.qemu(qemu)))
    pcsc = probe.pcsc(probe.pcscd_version())
    report.add(*doctor.check_pcscd(pcsc))
    report.add(*doctor.check_cards(probe.card_needs(cards, pcsc), pcsc, os.getpid()))
    report.add(*doctor.check_clients(pcsc, os.getpid()))
    for card in cards:
        d = probe.socket_dir(card)
        if d is not None:
            report.add(doctor.check_socket_dir(d))
    report.add(*doctor.check_libvirt(facts))
    for check in report.checks:
        print(check.line())
    print("run would serve this config" if report.serves and cards else
          "nothing to serve without a CONFIG" if report.serves else
          "run would NOT serve this config (see the FAIL lines)")
    return report.exit_status()
