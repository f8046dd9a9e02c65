"""Recognising a T=1 block where the guest should send an APDU (session rule R11).

Pure.  usb-ccid works at TPDU level and forwards a guest's XfrBlock payload
verbatim as a VSC_APDU.  Released QEMUs (up to 11.1) offer only T=0, so that
payload is an APDU.  QEMU's development tree adds usb-ccid's ``x-t1-support``
(on by default, docs/libvirt-facts.md#L33): a guest that negotiates T=1 then sends
**T=1 blocks** (ISO/IEC 7816-3 §11.3: NAD, PCB, LEN, INF, EDC), which a card
would take for garbage APDUs.  ccidbridge's generated config switches the
property off; this rule is the bridge's own guard when it is on anyway.

A payload is taken for a T=1 block only when every field agrees, so that real
APDUs are not refused:

* NAD has its two reserved bits (b8, b4) clear;
* PCB is one of the valid I-, R- or S-block values;
* LEN equals the INF length, with a 1-byte LRC (the default EDC, which
  libccid uses) that makes the XOR of the whole block zero;
* an I-block carries at least a 4-byte APDU (CLA INS P1 P2), an R-block no
  INF, an S-block at most one byte (IFS or WTX).

Untested against a real QEMU: no release offers T=1 (docs/libvirt-facts.md#L33);
the QEMU twin (lab/twin.py, ``t1_reader``) models it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

#: ISO/IEC 7816-3: an IFS is at most 254 bytes.
MAX_INF = 254
_R_PCBS = frozenset({0x80, 0x81, 0x82, 0x90, 0x91, 0x92})
_S_PCBS = frozenset({*range(0xC0, 0xC5), *range(0xE0, 0xE5)})
_S_NAMES = {0: "RESYNCH", 1: "IFS", 2: "ABORT", 3: "WTX", 4: "error"}


@dataclass(frozen=True, slots=True)
class T1Block:
    """What a T=1 block is, for the log (never its INF: an I-block may carry a PIN)."""

    kind: str  # "I", "R" or "S"
    pcb: int
    length: int

    def describe(self) -> str:
        if self.kind == "S":
            what = _S_NAMES[self.pcb & 0x1F] + (" response" if self.pcb & 0x20 else " request")
            return f"S-block ({what}, PCB {self.pcb:02X})"
        return f"{self.kind}-block (PCB {self.pcb:02X}, {self.length} bytes of INF)"


def _kind(pcb: int) -> str | None:
    if pcb & 0x80 == 0:
        return "I" if pcb & 0x1F == 0 else None
    if pcb in _R_PCBS:
        return "R"
    if pcb in _S_PCBS:
        return "S"
    return None


def t1_block(payload: bytes) -> T1Block | None:
    """The T=1 block ``payload`` is, or None when it is not one (an APDU)."""
    if len(payload) < 4:
        return None
    nad, pcb, length = payload[0], payload[1], payload[2]
    kind = _kind(pcb)
    if kind is None or nad & 0x88 or length > MAX_INF or len(payload) != length + 4:
        return None
    if reduce(lambda a, b: a ^ b, payload) != 0:
        return None
    if (kind == "I" and length < 4) or (kind == "R" and length) or (kind == "S" and length > 1):
        return None
    return T1Block(kind, pcb, length)


def refusal(payload: bytes) -> str | None:
    """Why R11 refuses ``payload`` (a log line's worth), or None to relay it."""
    block = t1_block(payload)
    if block is None:
        return None
    return (f"the guest sent a T=1 {block.describe()}, not an APDU: it negotiated T=1 "
            "(QEMU's usb-ccid x-t1-support is on); refused instead of garbling the card; "
            "set x-t1-support=off (ccidbridge qemu-argv/libvirt do) to keep the guest on T=0")
