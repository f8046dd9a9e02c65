"""What QEMU 7.2's ``ccid-card-passthru`` and ``usb-ccid`` impose on a peer.

Every QEMU quirk the bridge works around is named here once, with its reason;
the rest of the code refers to these names.  The facts behind them are
protocol/VSCARD.md#Q1 .. #Q16, observed on Debian's QEMU 7.2.22 and a real
Linux guest.
"""

from __future__ import annotations

#: ``VSCARD_IN_SIZE``: QEMU reassembles frames in one 64 KiB buffer and only
#: rewinds it when a read ends exactly on a frame boundary.  A frame that cannot
#: fit stops QEMU reading the chardev for good ("wedged", survives reconnects,
#: only a QEMU restart helps).  We never send a frame larger than this
#: (protocol/VSCARD.md#Q4).
QEMU_INPUT_BUFFER = 65536
MAX_FRAME_TO_QEMU = QEMU_INPUT_BUFFER

#: What QEMU may send us: a guest XfrBlock's abData (usb-ccid's bulk-out buffer
#: is 64 KiB including the 10-byte CCID header) as one VSC_APDU payload.  A
#: declared length above this is not a frame QEMU can produce: the peer is not
#: QEMU, or the stream is out of step (protocol/VSCARD.md#frames).
MAX_PAYLOAD_FROM_QEMU = 65536

#: usb-ccid's ``BULK_IN_BUF_SIZE`` (384) minus the 10-byte RDR_to_PC_DataBlock
#: header.  QEMU 7.2 silently drops a longer VSC_APDU response: the guest's
#: request is consumed and never answered, and the guest hangs until its
#: driver times out (3 s in libccid).  No response longer than this may leave
#: (protocol/VSCARD.md#Q8).
MAX_RESPONSE_TO_QEMU = 374

#: ``MAX_ATR_SIZE``: QEMU answers a longer VSC_ATR with Error(1) ("ATR size
#: exceeds spec, ignoring") and the guest sees no card (protocol/VSCARD.md#Q9).
MAX_ATR = 40

#: usb-ccid 7.2 advertises ``dwProtocols = 1``: T=0 only.  A card whose ATR
#: offers only T=1 cannot be connected to in the guest ("Protocol T=1 not
#: supported by reader") unless its ATR is rewritten to announce T=0 (atr.py;
#: protocol/VSCARD.md#Q10).
READER_PROTOCOLS = frozenset({0})

#: Longest reader name we put in VSC_ReaderAdd.  QEMU ignores the name; keeping
#: it short keeps every control frame far below the input buffer.
MAX_READER_NAME = 200

#: How long the card stays "removed" before it is announced again.  QEMU 7.2
#: tells the guest about card changes only through NotifySlotChange on the
#: interrupt endpoint, which the guest polls every 255 ms (bInterval 255 at
#: full speed); a removal and an ATR that fall between two polls merge into
#: one "present" notification, and the guest's pcscd, finding the card still
#: present, reports nothing.  Seen with a real guest after a bridge restart
#: (a pause of 250 ms still lost the removal now and then).  An ATR re-sent
#: while a card is present is no re-insertion to the guest either
#: (protocol/VSCARD.md#Q14).
REINSERT_PAUSE = 0.5


def check_atr(atr: bytes) -> str | None:
    """Predict QEMU 7.2's verdict on a VSC_ATR; ``None`` means accepted.

    Mirrors ``ccid-card-passthru``: at most :data:`MAX_ATR` bytes, TS must be
    3B or 3F, and a length estimate that walks at most two TD bytes, reading
    the byte *after* each TDi's interface bytes as the next TD (a QEMU bug:
    some well-formed ATRs such as ``3B 80 10 F0`` are rejected as too short).
    TCK is neither counted nor checked; "too long" is let through
    (protocol/VSCARD.md#Q9).
    """
    n = len(atr)
    if n > MAX_ATR:
        return f"it is {n} bytes long and QEMU accepts at most {MAX_ATR} (MAX_ATR_SIZE)"
    if n < 2:
        return "it is shorter than 2 bytes"
    if atr[0] not in (0x3B, 0x3F):
        return f"its first byte (TS) is {atr[0]:02X}; QEMU requires 3B or 3F"
    historical = atr[1] & 0x0F
    optional = 0
    td = atr[1] >> 4
    steps = 0
    while td and steps < 2 and optional + historical + 2 < n:
        steps += 1
        optional += bin(td & 0x7).count("1")
        if td & 0x8:
            optional += 1
            index = optional + 2  # QEMU reads one byte past TDi here
            td = atr[index] >> 4 if index < n else 0
    if n < 2 + historical + optional:
        return (
            f"QEMU's ATR check counts {historical} historical and {optional} interface bytes, "
            f"more than the {n} bytes given ('ATR is inconsistent')"
        )
    return None
