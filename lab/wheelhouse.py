"""``python -m lab.wheelhouse DIR``: the wheels a fresh, offline install of ccidbridge needs.

tests/test_wheel.py builds ccidbridge's wheel and installs it into a fresh
venv inside ``.ci/isolated``, which has no network.  So ``make setup`` fetches
here, once, what that needs: the build backend (pyproject's
``[build-system] requires``) and the runtime dependencies (``[project]
dependencies``), as wheels (pyscard, sdist-only on PyPI, is compiled here).
The test then runs pip with ``--no-index --find-links DIR``.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from lab import ROOT


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The build backend and the runtime dependencies, as pyproject.toml states them."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return [*data["build-system"]["requires"], *data["project"]["dependencies"]]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lab.wheelhouse DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(out), *requirements()],
        check=False,
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
