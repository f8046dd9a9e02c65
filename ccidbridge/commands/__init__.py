"""One module per ``ccidbridge`` sub-command (see ccidbridge.cli)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccidbridge.config import Config

#: Exit status for a config that is not valid (and for bad usage).
EXIT_CONFIG = 2


def load_config(path: str) -> Config | None:
    """The config at ``path``, or ``None`` once its ``FILE:LINE: ...`` error is printed."""
    from ccidbridge.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
