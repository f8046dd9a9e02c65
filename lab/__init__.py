"""The lab: a throwaway host stack (pcscd + vpcd, virtual cards, QEMU, a tiny
guest) started by the tests, the demo and the benchmarks.  It lives beside the
package, never inside it: the installed wheel holds only the bridge.

The lab's own child processes (``python -m lab.X``) find it through
:func:`child_env`, whatever their working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository: the directory that holds ``lab/``, ``ccidbridge/``, ``tests/``.
ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m lab.X`` child: this one, plus ROOT on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    if extra:
        env.update(extra)
    return env
