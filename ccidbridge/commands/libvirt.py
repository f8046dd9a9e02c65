"""``ccidbridge libvirt CONFIG``: the devices to paste into a libvirt domain."""

from __future__ import annotations

import argparse
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config
from ccidbridge.commands.qemu_argv import add_version_option, version_of
from ccidbridge.config.libvirt_xml import render


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "libvirt", help="print the devices to paste into a libvirt domain",
        description="Print CONFIG's ccid controller(s), smartcard(s) and channel(s) as "
        "libvirt 9.0 normalizes them (what `virsh dumpxml --inactive` shows), ready for the "
        "domain's <devices>.  Cards beyond the first come as a <qemu:commandline>.",
    )
    parser.add_argument("config", metavar="CONFIG")
    add_version_option(parser, "for the extra cards' <qemu:commandline> (-device syntax, "
                       "reconnect)")
    parser.add_argument(
        "--portable", action="store_true",
        help="leave out the USB ports, virtio-serial controller and ports libvirt assigns "
        "itself, for a domain that already has USB devices or a virtio-serial controller",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    sys.stdout.write(render(config.layout, version_of(args), portable=args.portable))
    return 0
