"""``ccidbridge qemu-argv CONFIG``: the QEMU arguments libvirt would build for the devices."""

from __future__ import annotations

import argparse
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config
from ccidbridge.commands.versions import COVERED, add_version_options, target_of
from ccidbridge.config.layout import layout
from ccidbridge.config.qemu_argv import render


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "qemu-argv", help="print the QEMU arguments for the config's devices",
        description="Print the QEMU arguments libvirt builds for CONFIG's devices, "
        f"shell-quoted on one line like `virsh domxml-to-native`.  Covers {COVERED}.",
    )
    parser.add_argument("config", metavar="CONFIG")
    add_version_options(parser, "JSON -device from 7.0, reconnect-ms from 9.2")
    parser.add_argument(
        "--usb", action="store_true",
        help="also add the USB controller (id=usb) a bare QEMU needs; libvirt adds its own",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    target = target_of(args)
    if target is None:
        return EXIT_CONFIG
    sys.stdout.write(render(layout(config.devices, target.libvirt), target, add_usb=args.usb))
    return 0
