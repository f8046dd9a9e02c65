"""Faults in VSCard input: every one the codec can detect has its own class.

All derive from :class:`VSCardError`, so a caller that only wants "this peer
speaks garbage" catches that one class; nothing else escapes the codec.
"""

from __future__ import annotations


class VSCardError(Exception):
    """A frame or byte stream that breaks the VSCard protocol."""


class FrameTooLarge(VSCardError):
    """A header declares more payload than any legal frame carries.

    Raised from the 12 header bytes alone, before any payload is buffered.
    """

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame declares {length} payload bytes, more than the {limit} allowed")
        self.length = length
        self.limit = limit


class UnknownMessageType(VSCardError):
    """A header whose type is none of the nine VSCard message types."""

    def __init__(self, msg_type: int) -> None:
        super().__init__(f"unknown message type {msg_type:#x}")
        self.msg_type = msg_type


class BadPayloadLength(VSCardError):
    """A payload whose length is impossible for its message type."""

    def __init__(self, type_name: str, length: int, allowed: str) -> None:
        super().__init__(f"{type_name} with {length} payload bytes; {allowed}")
        self.type_name = type_name
        self.length = length


class BadMagic(VSCardError):
    """An Init whose magic is not the four ASCII bytes "VSCD"."""

    def __init__(self, magic: bytes) -> None:
        super().__init__(f"Init with magic {magic.hex()} instead of 56534344 ('VSCD')")
        self.magic = magic


class TruncatedStream(VSCardError):
    """The stream ended (connection closed) in the middle of a frame."""

    def __init__(self, buffered: int) -> None:
        super().__init__(f"connection closed with {buffered} bytes of an unfinished frame")
        self.buffered = buffered


class UnexpectedDirection(VSCardError):
    """A message only the other role sends (e.g. ReaderAdd from QEMU)."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"the peer sent {type_name}, which its role never sends")
        self.type_name = type_name


class LocalProtocolError(Exception):
    """The caller misused a session (an event it does not take, or one after
    the session closed): a bug on our side, never the peer's fault.  Not a
    :class:`VSCardError`, so it is never mistaken for a peer's garbage."""
