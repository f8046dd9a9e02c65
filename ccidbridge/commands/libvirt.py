"""``ccidbridge libvirt CONFIG``: the devices to paste into a libvirt domain."""

from __future__ import annotations

import argparse
import os
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config
from ccidbridge.commands.versions import COVERED, add_version_options, target_of
from ccidbridge.config.layout import layout
from ccidbridge.config.libvirt_xml import render
from ccidbridge.lifecycle import metadata

DEVICES_HEAD = "<!-- paste into the domain's <devices>: -->"
METADATA_HEAD = ("<!-- paste into the domain's <metadata> (create it): ccidbridge's libvirt hook "
                 "starts the bridge with the domain -->")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "libvirt", help="print the devices to paste into a libvirt domain",
        description="Print CONFIG's ccid controller(s), smartcard(s) and channel(s) as "
        "libvirt normalizes them (what `virsh dumpxml --inactive` shows), ready for the "
        "domain's <devices>.  Cards beyond the first come as a <qemu:commandline>.  "
        f"Covers {COVERED}.",
    )
    parser.add_argument("config", metavar="CONFIG")
    add_version_options(parser, "for the extra cards' <qemu:commandline> (-device syntax, "
                        "reconnect)")
    parser.add_argument(
        "--portable", action="store_true",
        help="leave out the USB ports, virtio-serial controller and ports libvirt assigns "
        "itself, for a domain that already has USB devices or a virtio-serial controller",
    )
    parser.add_argument(
        "--metadata", metavar="PATH",
        help="also print the domain <metadata> element naming the config at PATH (absolute), "
        "so ccidbridge's libvirt hook starts and stops the bridge with the domain",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.metadata is not None and not os.path.isabs(args.metadata):
        print(f"ccidbridge: --metadata {args.metadata}: give an absolute path (the hook runs "
              "in libvirtd's directory, not this one)", file=sys.stderr)
        return EXIT_CONFIG
    target = target_of(args)
    if target is None:
        return EXIT_CONFIG
    devices = render(layout(config.devices, target.libvirt), target, portable=args.portable)
    if args.metadata is None:
        sys.stdout.write(devices)
        return 0
    if not devices.startswith(DEVICES_HEAD):
        devices = DEVICES_HEAD + "\n" + devices
    sys.stdout.write(devices + METADATA_HEAD + "\n  " + metadata.render(args.metadata) + "\n")
    return 0
