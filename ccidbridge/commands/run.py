"""``ccidbridge run CONFIG...``: serve every passthrough smartcard in the configs."""

from __future__ import annotations

import argparse
import logging
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config, served_of
from ccidbridge.runtime.trace import DEFAULT_MAX_BYTES, TraceError, TraceFile


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count of 1024 or more")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="serve the passthrough smartcards of one or more configs",
        description="Serve every passthrough smartcard in the given config files until "
        "SIGINT/SIGTERM.  -v logs every APDU (length, status word, round-trip time; "
        "never PIN data), -vv also the data of non-PIN commands.",
    )
    p.add_argument("--trace", metavar="FILE",
                   help="write every APDU as a JSON line to FILE (created 0600; header, "
                   "lengths, status word, latency; data only with -vv and never PIN data)")
    p.add_argument("--trace-max-bytes", metavar="N", type=_positive, default=DEFAULT_MAX_BYTES,
                   help=f"stop tracing when FILE reaches N bytes (default {DEFAULT_MAX_BYTES})")
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.set_defaults(func=run)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("ccidbridge").setLevel(level)


def run(args: argparse.Namespace) -> int:
    from ccidbridge.runtime.service import Service

    setup_logging(args.verbose, args.quiet)
    cards = []
    for path in args.configs:
        served = served_of(load_config(path), "serving")
        if served is None:
            return EXIT_CONFIG
        cards += served
    if not cards:
        where = ", ".join(args.configs)
        print(
            f"ccidbridge: nothing to serve in {where}: "
            "no passthrough smartcard on a tcp or unix socket",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    trace = 0 if args.quiet else min(args.verbose, 2)
    trace_file = None
    if args.trace:
        try:
            trace_file = TraceFile(args.trace, args.trace_max_bytes, with_data=args.verbose >= 2)
        except TraceError as exc:
            print(f"ccidbridge: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        return Service(cards, trace=trace, trace_file=trace_file).run()
    finally:
        if trace_file is not None:
            trace_file.close()
