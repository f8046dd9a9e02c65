"""``ccidbridge qemu-argv CONFIG``: the QEMU arguments libvirt would build for the devices."""

from __future__ import annotations

import argparse
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config
from ccidbridge.config.installed import qemu_version
from ccidbridge.config.qemu_argv import QemuVersion, render


def _version(text: str) -> QemuVersion:
    try:
        return QemuVersion.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_version_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--qemu-version", metavar="X.Y", type=_version, default=None,
        help=f"QEMU version to write for, {what} (default: the installed "
        "qemu-system-x86_64's, else the newest known)",
    )


def version_of(args: argparse.Namespace) -> QemuVersion:
    return args.qemu_version if args.qemu_version is not None else qemu_version()


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "qemu-argv", help="print the QEMU arguments for the config's devices",
        description="Print the QEMU arguments libvirt 9.0 builds for CONFIG's devices, "
        "shell-quoted on one line like `virsh domxml-to-native`.",
    )
    parser.add_argument("config", metavar="CONFIG")
    add_version_option(parser, "JSON -device from 7.0, reconnect-ms from 9.2")
    parser.add_argument(
        "--usb", action="store_true",
        help="also add the USB controller (id=usb) a bare QEMU needs; libvirt adds its own",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    sys.stdout.write(render(config.layout, version_of(args), add_usb=args.usb))
    return 0
