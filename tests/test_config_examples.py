"""examples/: one config per case, its generated files kept equal by this test."""

from __future__ import annotations

import shutil
from pathlib import Path

from ccidbridge.cli import main
from ccidbridge.config import load
from ccidbridge.config.serving import TLS_REASON
from lab.examples_regen import EXAMPLES, configs
from lab.examples_regen import main as regen

CASES = {"tcp-bind", "tcp-connect", "unix", "tls", "reconnect", "spicevmc", "host",
         "host-certificates", "two-cards"}


def test_every_case_has_an_example() -> None:
    assert {p.stem for p in configs()} >= CASES


def test_generated_files_are_current(capsys) -> None:
    status = regen(["--check"])
    assert status == 0, "run `make examples`:\n" + capsys.readouterr().out


def test_regen_writes_what_is_committed(tmp_path: Path) -> None:
    for config in configs():
        shutil.copy(config, tmp_path / config.name)
    assert regen(["--dir", str(tmp_path)]) == 0
    for made in sorted(tmp_path.iterdir()):
        assert made.read_text() == (EXAMPLES / made.name).read_text(), made.name
    (tmp_path / "tcp-bind.argv").write_text("stale\n")
    assert regen(["--check", "--dir", str(tmp_path)]) == 1


def test_check_reports_what_run_would_serve(capsys) -> None:
    served = {p.stem: len(load(str(p)).served_cards()) for p in configs()}
    assert served == {"tcp-bind": 1, "tcp-connect": 1, "unix": 1, "tls": 0, "reconnect": 1,
                      "spicevmc": 0, "host": 0, "host-certificates": 0, "two-cards": 2}
    assert load(str(EXAMPLES / "tls.xml")).unserved()[0][1] == TLS_REASON
    assert main(["check", str(EXAMPLES / "tls.xml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and TLS_REASON in out
    assert main(["check", str(EXAMPLES / "two-cards.xml")]) == 0
    out = capsys.readouterr().out
    assert "two-cards.xml:4 smartcard0: tcp 127.0.0.1:2005 (connecting)" in out
    assert "two-cards.xml:8 smartcard1: unix /run/ccidbridge/vm2-card2.sock (connecting)" in out
    assert "<qemu:commandline>" in out
