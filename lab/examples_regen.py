"""Regenerate examples/*.libvirt.xml and examples/*.argv from examples/*.xml.

``python -m lab.examples_regen`` (``make examples``) rewrites them;
``--check`` only reports the stale ones (exit 1), which is what the test runs.
The output is written for QEMU 7.2 with libvirt 9.0 (Debian 12); the oracle
suite compares the same configs for the newer stacks too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccidbridge.config import load
from ccidbridge.config.layout import layout
from ccidbridge.config.libvirt_xml import render as render_libvirt
from ccidbridge.config.qemu_argv import render as render_argv
from ccidbridge.config.versions import LibvirtVersion, QemuVersion, Target

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QEMU = Target(QemuVersion(7, 2), LibvirtVersion(9, 0))


def configs(directory: Path = EXAMPLES) -> list[Path]:
    return sorted(p for p in directory.glob("*.xml") if not p.name.endswith(".libvirt.xml"))


def generated(config: Path) -> dict[Path, str]:
    """The generated files of one example config, and their text."""
    lay = layout(load(str(config)).devices, QEMU.libvirt)
    stem = config.with_suffix("")
    return {
        stem.with_name(stem.name + ".libvirt.xml"): render_libvirt(lay, QEMU),
        stem.with_name(stem.name + ".argv"): render_argv(lay, QEMU),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.examples_regen")
    parser.add_argument("--check", action="store_true", help="only list stale files")
    parser.add_argument("--dir", type=Path, default=EXAMPLES)
    args = parser.parse_args(argv)
    stale = []
    for config in configs(args.dir):
        for path, text in generated(config).items():
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
                if not args.check:
                    path.write_text(text, encoding="utf-8")
    verb = "stale" if args.check else "rewrote"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
