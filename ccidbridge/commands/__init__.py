"""One module per ``ccidbridge`` sub-command (see ccidbridge.cli)."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccidbridge.config import Config
    from ccidbridge.spec import ServedCard

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


def served_of(config: Config | None, verb: str) -> list[ServedCard] | None:
    """The cards of ``config`` (as load_config gave it) that ``run``/``attach``
    serve, or ``None`` if there is no config or once its safety refusals are
    printed (``FILE:LINE: ...``).  Devices it leaves alone are logged with the
    reason ("not VERB LABEL: ...")."""
    if config is None:
        return None
    if config.refused:
        for refusal in config.refused:
            print(refusal, file=sys.stderr)
        return None
    for label, reason in config.unserved():
        logging.getLogger("ccidbridge").warning("not %s %s: %s", verb, label, reason)
    return config.served_cards()
