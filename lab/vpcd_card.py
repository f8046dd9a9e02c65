"""ccidbridge's own deterministic test card, speaking vpcd's socket protocol.

Why our own card and not vicc (docs/lab.md#V9):
Debian 12's vicc needs a wrapper, crashes on some APDUs and cannot be told to
hang or answer with chosen status words.  This card can, and it runs at about
0.1 ms per APDU.

The vpcd transport and the process wrapper are shared with the other test
cards: lab/cards/vpcd.py.

Instruction set (all deterministic unless ``random_challenge``):

=============  ===============================================================
SELECT  A4     P1=04 by AID: known AIDs → 9000 (+FCI when P2 asks for it),
               else 6A82.  P1=00/02 by FID: 3F00 (MF) and 0101 (a 1024-byte
               EF) → 9000, else 6A82.
READ BIN B0    current EF (or SFI 1 via P1=0x81): bytes ``i & 0xFF``; offset
               P1P2; past the end → 6B00; short read → data + 6282.
GET CHAL 84    Le bytes (Le=00 → 256) + 9000; no Le → 6700.
VERIFY   20    PIN "1234" → 9000 (retries reset to 3); wrong → 63Cx, then
               6983 when blocked; no data → 9000 if verified else 63Cx.
80 10 ECHO     P1P2 = N ≠ 0 → N pattern bytes (any length, e.g. 4096, even for
               a short APDU); else data → the data; else Le pattern bytes.
80 12 SW       returns Le pattern bytes (if Le) + SW1 SW2 = P1 P2.
80 14 COUNT    4-byte big-endian count of APDUs since power-on (this one
               included) + 9000.
other          6D00 (and 6E00 for CLA FF).
=============  ===============================================================

Fault injection (``Behaviour``): ``hang_ins`` (never answer that INS),
``crash_ins`` (close the socket instead of answering: pcscd then returns rv=0
with an empty response, docs/lab.md#V7), ``delay_ms`` (answer every APDU late).

Run as a process: ``python -m lab.vpcd_card --port P [--atr HEX|PRESET]
[--behaviour hang=84 --behaviour crash=B0 --behaviour slow=20 --behaviour random]``.
Or in-process: ``VpcdCard(port).start()`` (a daemon thread) … ``.stop()``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ccidbridge.protocol.atr import tck
from lab.cards.apdu import Apdu
from lab.cards.vpcd import Crash, Hang, ModuleProcess, VpcdClient, serve_forever

__all__ = ["Apdu", "Crash", "Hang"]  # re-exported: they live in lab/cards/ now

_HIST = b"ccidbridge"  # historical bytes: makes our ATRs recognisable in logs
_DUAL = bytes([0x3B, 0x80 | len(_HIST), 0x80, 0x01]) + _HIST

#: ATR presets.  ``t1`` is the YubiKey's (TD1=81: T=1 only, so a T=0 connect
#: fails with SCARD_E_PROTO_MISMATCH); ``t0`` has no TD1 (implicit T=0 only);
#: ``dual`` offers T=0 and T=1 (TD1=80 → T=0, TD2=01 → T=1); ``vicc`` is
#: vicc's iso7816 ATR (T=1 only).
ATR_PRESETS: dict[str, bytes] = {
    "t1": bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940"),
    "yubikey": bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940"),
    "t0": bytes([0x3B, 0x10 | len(_HIST), 0x96]) + _HIST,
    "dual": _DUAL + bytes([tck(_DUAL[1:])]),  # TCK: the ATR offers T=1 too
    "vicc": bytes.fromhex("3B951381018073FF01000B"),
}
DEFAULT_ATR = ATR_PRESETS["dual"]

PIN = b"1234"
PIN_TRIES = 3
#: AIDs SELECT knows (PIV, OpenPGP, and a private test AID).
KNOWN_AIDS: tuple[bytes, ...] = (
    bytes.fromhex("A000000308000010000100"),
    bytes.fromhex("D27600012401"),
    bytes.fromhex("F0636369646272"),  # F0 + "ccidbr"
)
EF_FID = 0x0101
EF_SIZE = 1024
MF_FID = 0x3F00


def parse_atr(text: str) -> bytes:
    """A preset name or hex (spaces and colons allowed)."""
    if text.lower() in ATR_PRESETS:
        return ATR_PRESETS[text.lower()]
    return bytes.fromhex(text.replace(":", " "))


def pattern(n: int, start: int = 0) -> bytes:
    """The deterministic payload every bulk answer uses: byte i is ``(start+i) & 0xFF``."""
    return bytes((start + i) & 0xFF for i in range(n))


@dataclass
class Behaviour:
    """Fault injection and options; all off by default."""

    hang_ins: frozenset[int] = frozenset()
    crash_ins: frozenset[int] = frozenset()
    delay_ms: float = 0.0
    random_challenge: bool = False

    @classmethod
    def parse(cls, items: list[str]) -> Behaviour:
        """CLI form: ``hang=84``, ``crash=B0`` (hex INS), ``slow=20`` (ms), ``random``."""
        b = cls()
        for item in items:
            key, _, val = item.partition("=")
            if key == "hang":
                b.hang_ins = b.hang_ins | {int(val, 16)}
            elif key == "crash":
                b.crash_ins = b.crash_ins | {int(val, 16)}
            elif key == "slow":
                b.delay_ms = float(val)
            elif key == "random":
                b.random_challenge = True
            else:
                raise ValueError(f"unknown behaviour {item!r}")
        return b

    def to_args(self) -> list[str]:
        out: list[str] = []
        for ins in sorted(self.hang_ins):
            out += ["--behaviour", f"hang={ins:02X}"]
        for ins in sorted(self.crash_ins):
            out += ["--behaviour", f"crash={ins:02X}"]
        if self.delay_ms:
            out += ["--behaviour", f"slow={self.delay_ms:g}"]
        if self.random_challenge:
            out += ["--behaviour", "random"]
        return out


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


@dataclass
class CardLogic:
    """The ISO-7816-ish card, independent of any transport (so it is unit-testable)."""

    atr: bytes = DEFAULT_ATR
    behaviour: Behaviour = field(default_factory=Behaviour)
    tries_left: int = PIN_TRIES
    verified: bool = False
    selected_ef: int | None = None
    powered: bool = False
    apdu_count: int = 0
    _challenge_counter: int = 0

    def power_on(self) -> None:
        self.powered = True
        self.verified = False
        self.selected_ef = None
        self.apdu_count = 0

    def power_off(self) -> None:
        self.powered = False
        self.verified = False
        self.selected_ef = None

    def process(self, raw: bytes) -> bytes:
        """Answer one C-APDU; may raise ``Hang`` or ``Crash`` per the behaviour."""
        self.apdu_count += 1
        if len(raw) >= 2:
            if raw[1] in self.behaviour.hang_ins:
                raise Hang()
            if raw[1] in self.behaviour.crash_ins:
                raise Crash()
        try:
            a = Apdu.parse(raw)
        except ValueError:
            return _sw(0x6700)
        if a.cla == 0xFF:
            return _sw(0x6E00)
        handler = {
            (0x00, 0xA4): self._select,
            (0x00, 0xB0): self._read_binary,
            (0x00, 0x84): self._get_challenge,
            (0x00, 0x20): self._verify,
            (0x80, 0x10): self._echo,
            (0x80, 0x12): self._status,
            (0x80, 0x14): self._count,
        }.get((0x80 if a.cla & 0x80 else 0x00, a.ins))
        if handler is None:
            return _sw(0x6D00)
        return handler(a)

    def _select(self, a: Apdu) -> bytes:
        want_fci = (a.p2 & 0x0C) != 0x0C
        if a.p1 == 0x04:
            if a.data not in KNOWN_AIDS:
                return _sw(0x6A82)
            if want_fci:
                fci = b"\x6f" + bytes([len(a.data) + 2]) + b"\x84" + bytes([len(a.data)]) + a.data
                return fci + _sw(0x9000)
            return _sw(0x9000)
        if a.p1 in (0x00, 0x02) and len(a.data) == 2:
            fid = int.from_bytes(a.data, "big")
            if fid == MF_FID:
                self.selected_ef = None
            elif fid == EF_FID:
                self.selected_ef = EF_FID
            else:
                return _sw(0x6A82)
            if want_fci:
                size = EF_SIZE if fid == EF_FID else 0
                fcp = b"\x62\x08\x80\x02" + size.to_bytes(2, "big") + b"\x83\x02" + a.data
                return fcp + _sw(0x9000)
            return _sw(0x9000)
        if a.p1 == 0x00 and not a.data:
            self.selected_ef = None
            return _sw(0x9000)
        return _sw(0x6A86)

    def _read_binary(self, a: Apdu) -> bytes:
        if a.p1 & 0x80:
            if a.p1 & 0x1F != 1:
                return _sw(0x6A82)
            offset = a.p2
        else:
            if self.selected_ef != EF_FID:
                return _sw(0x6986)
            offset = (a.p1 << 8) | a.p2
        if offset >= EF_SIZE:
            return _sw(0x6B00)
        want = a.le if a.le is not None else 256
        data = pattern(min(want, EF_SIZE - offset), offset)
        return data + _sw(0x9000 if len(data) == want else 0x6282)

    def _get_challenge(self, a: Apdu) -> bytes:
        if a.le is None:
            return _sw(0x6700)
        if self.behaviour.random_challenge:
            data = os.urandom(a.le)
        else:
            data = pattern(a.le, self._challenge_counter)
            self._challenge_counter = (self._challenge_counter + a.le) & 0xFF
        return data + _sw(0x9000)

    def _verify(self, a: Apdu) -> bytes:
        if not a.data:
            if self.verified:
                return _sw(0x9000)
            return _sw(0x63C0 | self.tries_left) if self.tries_left else _sw(0x6983)
        if self.tries_left == 0:
            return _sw(0x6983)
        if a.data == PIN:
            self.tries_left = PIN_TRIES
            self.verified = True
            return _sw(0x9000)
        self.tries_left -= 1
        self.verified = False
        return _sw(0x63C0 | self.tries_left)

    def _echo(self, a: Apdu) -> bytes:
        n = (a.p1 << 8) | a.p2
        if n:
            return pattern(n) + _sw(0x9000)
        if a.data:
            return a.data + _sw(0x9000)
        return pattern(a.le or 0) + _sw(0x9000)

    def _status(self, a: Apdu) -> bytes:
        return pattern(a.le or 0) + bytes([a.p1, a.p2])

    def _count(self, a: Apdu) -> bytes:
        return self.apdu_count.to_bytes(4, "big") + _sw(0x9000)


class VpcdCard(VpcdClient):
    """This card on vpcd (lab/cards/vpcd.py's loop with a :class:`CardLogic`)."""

    logic: CardLogic

    def __init__(
        self,
        port: int,
        *,
        atr: bytes = DEFAULT_ATR,
        behaviour: Behaviour | None = None,
        host: str = "127.0.0.1",
        connect_timeout: float = 10.0,
    ) -> None:
        behaviour = behaviour or Behaviour()
        super().__init__(
            port, CardLogic(atr=atr, behaviour=behaviour), host=host,
            connect_timeout=connect_timeout, delay_ms=behaviour.delay_ms,
        )  # fmt: skip


class CardProcess(ModuleProcess):
    """This card as a separate process, so tests can SIGSTOP/SIGKILL it.

    Output (stdout+stderr) goes to ``log_path`` when given.
    """

    def __init__(
        self,
        port: int,
        *,
        atr: bytes = DEFAULT_ATR,
        behaviour: Behaviour | None = None,
        log_path: Path | str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.atr = atr
        self.behaviour = behaviour or Behaviour()
        super().__init__(
            "lab.vpcd_card", port, ["--atr", atr.hex(), *self.behaviour.to_args()],
            log_path=log_path, python=python,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lab.vpcd_card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, required=True, help="vpcd slot port (35963 = first slot)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--atr", default="dual", help=f"hex or preset: {', '.join(ATR_PRESETS)}")
    p.add_argument(
        "--behaviour",
        action="append",
        default=[],
        help="hang=INS, crash=INS (hex), slow=MS, random; repeatable",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    card = VpcdCard(
        args.port,
        atr=parse_atr(args.atr),
        behaviour=Behaviour.parse(args.behaviour),
        host=args.host,
        connect_timeout=args.connect_timeout,
    )
    return serve_forever(card, "vpcd_card")


if __name__ == "__main__":
    sys.exit(main())
