"""Put one of the test cards into a slot of the lab's pcscd (lab/pcsc.py) and take it out.

A :class:`~lab.cards.vpcd.CardSpec` says how to run a card both ways: ``make()`` builds its
logic for the in-process form (a thread in this process), ``module`` + ``args``
is the process form (``python -m MODULE --port P ARGS``).  Each card module
has a ``spec(...)`` function that returns one.
"""

from __future__ import annotations

import signal
from pathlib import Path

from lab.cards.apdu import Applet
from lab.cards.vpcd import CardSpec, ModuleProcess, VpcdClient
from lab.pcsc import CardState, LabError, PcscStack, ReaderSlot, wait_card_state


class CardInSlot:
    """A test card in one vpcd slot, PRESENT once :meth:`insert` returns."""

    def __init__(
        self,
        stack: PcscStack,
        spec: CardSpec,
        *,
        reader: str | None = None,
        process: bool = True,
        log_dir: Path | None = None,
    ) -> None:
        self.stack = stack
        self.spec = spec
        self.process = process
        if reader is None:
            self.slot: ReaderSlot = stack.claim_slot()
        else:
            self.slot = stack.slot(reader)
        self.reader = self.slot.name
        self.port = self.slot.port
        self.log_path = (log_dir or stack.workdir) / f"card-{self.port}.log"
        self.runner: ModuleProcess | VpcdClient | None = None
        #: the in-process card's logic (``process=False`` only)
        self.logic: Applet | None = None
        self.inserted_state: CardState | None = None

    @property
    def pid(self) -> int | None:
        return self.runner.pid if isinstance(self.runner, ModuleProcess) else None

    def insert(self, *, timeout: float = 10.0) -> CardInSlot:
        if self.runner is not None:
            raise LabError(f"{self.reader!r}: card already inserted")
        if self.process:
            self.runner = ModuleProcess(
                self.spec.module, self.port, self.spec.args, log_path=self.log_path
            ).start()
        else:
            if self.spec.make is None:
                raise LabError(f"{self.spec.module}: no in-process form")
            self.logic = self.spec.make()
            self.runner = VpcdClient(self.port, self.logic).start()
        try:
            self.inserted_state = wait_card_state(self.reader, True, timeout)
        except TimeoutError as exc:
            raise LabError(f"{exc}; card log: {self.log_tail()}") from exc
        return self

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def remove(self, *, wait: bool = True, timeout: float = 5.0) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        if isinstance(runner, ModuleProcess):
            runner.stop(signal.SIGTERM)
        else:
            runner.stop()
        if wait and self.stack.running:
            wait_card_state(self.reader, False, timeout)

    def close(self) -> None:
        try:
            self.remove()
        except (TimeoutError, LabError):
            pass
        finally:
            self.stack.release_slot(self.reader)

    def __enter__(self) -> CardInSlot:
        return self.insert()

    def __exit__(self, *exc: object) -> None:
        self.close()
