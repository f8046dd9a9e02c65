"""``ccidbridge readers``: the host's PC/SC readers, card state and ATR.

The ATR is printed the way ``<reader atr=...>`` accepts it, so it can be
copied into a config.  When pcscd is not running this says so in one line and
exits 1 (pyscard itself would raise an EstablishContextException,
docs/pcsc-lite.md#P1).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccidbridge.card.listing import ReaderInfo


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "readers",
        help="list the host's PC/SC readers, whether a card is present, and its ATR",
        description="List the host's PC/SC readers (one line each): name, card present "
        "or not, and the card's ATR in the form <reader atr=...> accepts.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead")
    p.set_defaults(func=run)


def format_line(info: ReaderInfo) -> str:
    if info.card_present and info.atr:
        return f"{info.name}: card present, ATR {info.atr.hex(' ').upper()}"
    if info.card_present:
        return f"{info.name}: card present"
    return f"{info.name}: no card"


def as_json(infos: list[ReaderInfo]) -> str:
    return json.dumps(
        [
            {
                "name": i.name,
                "card_present": i.card_present,
                "atr": i.atr.hex().upper() if i.atr else None,
            }
            for i in infos
        ],
        indent=2,
    )


def run(args: argparse.Namespace) -> int:
    try:  # imported here: a broken pyscard must not break the other commands
        from ccidbridge.card.listing import PcscUnavailable, reader_infos
    except ImportError as exc:
        if not (exc.name or "").startswith("smartcard"):
            raise  # our own bug: let it show
        print(f"ccidbridge: pyscard is not usable: {exc}", file=sys.stderr)
        return 1
    try:
        infos = reader_infos()
    except PcscUnavailable as exc:
        print(f"ccidbridge: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(as_json(infos))
    elif not infos:
        print("no PC/SC readers")
    else:
        for info in infos:
            print(format_line(info))
    return 0
