"""No import circle: the runtime and the card side get their types from ccidbridge.spec.

They are given a ``ServedCard`` (reader spec, endpoint) and never import the
config package; the config package builds those from a file.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ccidbridge.config import loads


@pytest.mark.parametrize("module", ["ccidbridge.spec", "ccidbridge.runtime.service",
                                    "ccidbridge.runtime.bridge", "ccidbridge.card.pcsc",
                                    "ccidbridge.protocol.session"])
def test_serving_side_never_imports_the_config(module: str) -> None:
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in sys.modules if m.startswith('ccidbridge.config'))\n"
            "print(bad)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


def test_a_service_name_is_resolved_once_by_the_parser() -> None:
    config = loads("<ccidbridge><smartcard mode='passthrough' type='tcp'><source mode='bind' "
                   "host='127.0.0.1' service='ssh'/></smartcard></ccidbridge>", "vm.xml")
    (card,) = config.devices.smartcards
    assert card.chardev is not None and card.chardev.source is not None
    assert (card.chardev.source.service, card.chardev.source.port) == ("ssh", 22)
    assert config.served_cards()[0].endpoint.port == 22
    assert config.layout.cards[0].card is card  # laid out once, at load
