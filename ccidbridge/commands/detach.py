"""``ccidbridge detach DOMAIN [CONFIG]``: remove what an attach added, e.g. after
the attaching process was killed (found by the ids' ``ccidbridge-`` prefix)."""

from __future__ import annotations

import argparse
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config
from ccidbridge.commands.attach import add_target_options


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "detach", help="remove the card(s) an attach added to a VM",
        description="Remove the readers, cards and chardevs `ccidbridge attach` added to a "
        "running domain (all of them, or CONFIG's only), e.g. after the attaching process "
        "was killed.  A live attach is left alone unless --force: SIGTERM it instead.",
    )
    add_target_options(p)
    p.add_argument("config", metavar="CONFIG", nargs="?")
    p.add_argument("--force", action="store_true",
                   help="also when the attaching process still runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ccidbridge.lifecycle import plan
    from ccidbridge.lifecycle.attach import (
        AttachError,
        open_monitor,
        our_objects,
        pid_alive,
        remove,
    )
    from ccidbridge.lifecycle.monitor import MonitorError

    tag = None
    if args.config is not None:
        config = load_config(args.config)
        if config is None:
            return EXIT_CONFIG
        tag = plan.config_tag(config.path)
    try:
        mon = open_monitor(None if args.qmp else args.domain, args.uri, args.qmp)
        found = our_objects(mon)
        cards = {c for c in found.cards if tag is None or c.tag == tag}
        if not cards:
            print(f"nothing of ccidbridge's is attached to {mon.where}")
            return 0
        alive = sorted({c.pid for c in cards if pid_alive(c.pid)})
        if alive and not args.force:
            print(f"ccidbridge: {mon.where}: attached by running process "
                  f"{', '.join(map(str, alive))}: stop it with SIGTERM (`kill "
                  f"{alive[0]}`), it detaches by itself; or use --force", file=sys.stderr)
            return 1
        problems = remove(mon, cards)
    except (AttachError, MonitorError) as exc:
        print(f"ccidbridge: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"ccidbridge: {problem}", file=sys.stderr)
    if problems:
        return 1
    for cid in sorted(cards, key=lambda c: c.number):
        print(f"removed {cid.ccid}, {cid.card}, {cid.char} from {mon.where}")
    return 0
