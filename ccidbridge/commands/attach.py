"""``ccidbridge attach DOMAIN CONFIG``: plug the config's card(s) into a running VM
until SIGINT/SIGTERM, then unplug them (ccidbridge.lifecycle.attach)."""

from __future__ import annotations

import argparse
import logging
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config, served_of

DEFAULT_URI = "qemu:///system"


def add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN",
                   help="libvirt domain name (with --qmp: only names it in messages)")
    p.add_argument("-c", "--connect", dest="uri", default=DEFAULT_URI, metavar="URI",
                   help=f"libvirt URI (default {DEFAULT_URI})")
    p.add_argument("--qmp", metavar="PATH",
                   help="the QMP Unix socket of a QEMU run by hand, instead of libvirt")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attach", help="lend a running VM the config's card(s) until SIGINT/SIGTERM",
        description="Add the config's passthrough card(s) to a running domain (a USB CCID "
        "reader, its chardev and the card), serve them as `run` does until SIGINT/SIGTERM, "
        "then remove them: to the guest, a USB reader plugged in and pulled out again.",
    )
    add_target_options(p)
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ccidbridge.commands.run import setup_logging
    from ccidbridge.lifecycle.attach import (
        TAINT_NOTE,
        AttachError,
        open_monitor,
        prepare,
        serve_attached,
    )
    from ccidbridge.runtime.service import Service

    setup_logging(args.verbose, args.quiet)
    config = load_config(args.config)
    cards = served_of(config, "attaching")
    if config is None or cards is None:
        return EXIT_CONFIG
    if not cards:
        print(f"ccidbridge: nothing to attach in {args.config}: no passthrough smartcard on a "
              "tcp or unix socket", file=sys.stderr)
        return EXIT_CONFIG
    try:
        mon = open_monitor(None if args.qmp else args.domain, args.uri, args.qmp)
        steps = prepare(mon, config, cards)
    except AttachError as exc:
        print(f"ccidbridge: {exc}", file=sys.stderr)
        return 1
    if not args.qmp:
        logging.getLogger("ccidbridge").warning("%s", TAINT_NOTE)
    trace = 0 if args.quiet else min(args.verbose, 2)
    return serve_attached(mon, cards, steps, Service(cards, trace=trace))
