"""The ``ccidbridge`` command line: one sub-command per module.

Each sub-command module exposes ``add_parser(subparsers)``; the parser it adds
carries ``func=callable(args) -> int`` as its default.  An unknown command is
argparse's usage error (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `ccidbridge --help` lists them.
COMMANDS = (
    "ccidbridge.commands.run",
    "ccidbridge.commands.readers",
    "ccidbridge.commands.check",
    "ccidbridge.commands.libvirt",
    "ccidbridge.commands.qemu_argv",
    "ccidbridge.commands.attach",
    "ccidbridge.commands.detach",
    "ccidbridge.commands.doctor",
    "ccidbridge.commands.hook",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccidbridge",
        description="Relay a host smartcard into a QEMU/libvirt guest (VSCard passthrough).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:  # an import error in a command module is a bug: it surfaces
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
