"""``ccidbridge check CONFIG``: validate, then say what ``run`` would serve and why not."""

from __future__ import annotations

import argparse
import sys

from ccidbridge.commands import EXIT_CONFIG, load_config
from ccidbridge.commands.versions import COVERED, add_version_options, target_of
from ccidbridge.config.serving import notes
from ccidbridge.spec import ReaderSpec


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check", help="validate a config and show what `run` would serve",
        description="Validate CONFIG (libvirt's vocabulary and rules) and list which cards "
        "`ccidbridge run` would serve, and which it would not, with the reason.  "
        f"Covers {COVERED}.",
    )
    parser.add_argument("config", metavar="CONFIG")
    add_version_options(parser, "for the notes about the generated output")
    parser.set_defaults(func=run)


def describe_reader(reader: ReaderSpec) -> str:
    if reader.name is not None:
        which = f"reader '{reader.name}'"
    elif reader.match is not None:
        which = f"the first reader matching '{reader.match}'"
    else:
        which = "the first reader with a card"
    extra = [reader.share.value, f"protocol {reader.protocol.value}",
             f"APDU timeout {reader.apdu_timeout:g} s"]
    if reader.atr is not None:
        extra.append(f"ATR {reader.atr.hex(' ').upper()}"
                     + (f" mask {reader.atr_mask.hex(' ').upper()}" if reader.atr_mask else ""))
    if not reader.rewrite_atr:
        extra.append("ATR passed unchanged")
    return f"{which} ({', '.join(extra)})"


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config is None:
        return EXIT_CONFIG
    target = target_of(args)
    if target is None:
        return EXIT_CONFIG
    served = config.served_cards()
    unserved = config.unserved()
    print(f"{config.path}: valid")
    print(f"run would serve {len(served)} card(s):")
    for card in served:
        print(f"  {card.label}: {card.endpoint.describe()} <- {describe_reader(card.reader)}")
    if unserved:
        print(f"run would not serve {len(unserved)} device(s):")
        for label, reason in unserved:
            print(f"  {label}: {reason}")
    for note in notes(config):
        print(f"note: {note}")
    if target.reconnect_broken and any(
            src.reconnect is not None for card in config.devices.smartcards
            if card.chardev is not None for src in card.chardev.sources):
        print(f"note: libvirt {target.libvirt} writes reconnect=<s>, which QEMU "
              f"{target.qemu} no longer accepts: the domain will not start with <reconnect> "
              "(use libvirt >= 10.9, or drop <reconnect>)")
    print(f"output is for {target}" + (" (usb-ccid offers T=1: generated with "
          "x-t1-support=off, so the guest stays on T=0)" if target.usb_ccid_t1 else ""))
    for refusal in config.refused:
        print(refusal, file=sys.stderr)
    return EXIT_CONFIG if config.refused else 0
