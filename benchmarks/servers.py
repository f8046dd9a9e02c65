"""The processes a benchmark times, each run as ``python -m benchmarks.servers MODE ...``.

Every mode connects to the benchmark's peer, which listens where QEMU would
(``server=on,wait=off``), so all of them are measured over the same socket
type and direction, each in a process of its own like ``ccidbridge run``:

``bridge``
    ccidbridge itself: a :class:`~ccidbridge.runtime.service.Service` serving
    one or more cards, each a real PC/SC card side (``--reader NAME``) or an
    :class:`~lab.instant_card.InstantCard` (``--reader instant``).
``floor``
    The least any bridge can be: a blocking loop that cuts VSC_APDU frames
    from the socket and answers each at once with a fixed ``90 00`` frame.
    No handshake, no card, no event loop.
``echo``
    Less than that: every byte read is written straight back.
``relay``
    The calibration point of the APDU targets: a minimal blocking relay, one loop
    that reads a frame, calls SCardTransmit and writes the answer (no
    handshake, no session, no threads).
``session-relay``
    A design probe: ccidbridge's own sans-IO :class:`BridgeSession` (the
    whole protocol: handshake, acks, sequencing, chaining) driven by one
    blocking ``recv`` loop that also calls SCardTransmit.  The product's APDU
    thread does the same with ``poll`` instead of a blocking ``recv``, plus
    the watchdog's hand-off lock, card events, timers and backpressure; the
    gap between the two is what that machinery costs.  Not a product.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import struct
import sys
import time

from ccidbridge.spec import Endpoint, ReaderSpec, ServedCard

_HDR = struct.Struct(">III")
APDU_TYPE = 7


def parse_endpoint(text: str) -> Endpoint:
    """``unix:PATH`` or ``tcp:PORT`` (loopback); the bridge connects to it."""
    kind, _, where = text.partition(":")
    if kind == "unix":
        return Endpoint("unix", bridge_listens=False, path=where)
    return Endpoint("tcp", bridge_listens=False, host="127.0.0.1", port=int(where))


def connect(endpoint: Endpoint) -> socket.socket:
    if endpoint.kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(endpoint.path)
    else:
        s = socket.create_connection((endpoint.host, endpoint.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def frames(sock: socket.socket):
    """Yield whole frames (header+payload) from a blocking socket until EOF."""
    buf = b""
    recv = sock.recv
    while True:
        data = recv(65536)
        if not data:
            return
        buf += data
        while len(buf) >= 12:
            end = 12 + _HDR.unpack_from(buf)[2]
            if len(buf) < end:
                break
            yield buf[:end]
            buf = buf[end:]


def run_floor(endpoint: Endpoint) -> None:
    sock = connect(endpoint)
    answer = _HDR.pack(APDU_TYPE, 0, 2) + b"\x90\x00"
    send = sock.sendall
    for _ in frames(sock):
        send(answer)


def run_echo(endpoint: Endpoint) -> None:
    sock = connect(endpoint)
    recv, send = sock.recv, sock.sendall
    while data := recv(65536):
        send(data)


def run_relay(endpoint: Endpoint, reader: str) -> None:
    from smartcard import scard

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0, hex(hr)
    protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    hr, h, proto = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_EXCLUSIVE, protocols)
    assert hr == 0, hex(hr)
    sock = connect(endpoint)
    send, transmit, pack = sock.sendall, scard.SCardTransmit, _HDR.pack
    for f in frames(sock):
        hr, resp = transmit(h, proto, list(f[12:]))
        send(pack(APDU_TYPE, 0, len(resp)) + bytes(resp))
    scard.SCardDisconnect(h, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(ctx)


def run_session_relay(endpoint: Endpoint, reader: str) -> None:
    from smartcard import scard

    from ccidbridge.protocol import events as ev
    from ccidbridge.protocol.session import BridgeSession

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0, hex(hr)
    protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    hr, h, proto = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_EXCLUSIVE, protocols)
    assert hr == 0, hex(hr)
    atr = bytes(scard.SCardStatus(h)[4])
    sock = connect(endpoint)
    session = BridgeSession(reader_name=reader)
    session.handle(ev.ConnectionOpened())
    session.handle(ev.CardInserted(atr))
    send, recv, transmit = sock.sendall, sock.recv, scard.SCardTransmit
    transmit_type = ev.TransmitApdu
    hold = getattr(ev, "HoldAtr", None)
    while True:
        out = session.data_to_send()
        if out:
            send(out)
        data = recv(65536)
        if not data:
            break
        session.receive_data(data)
        for event in list(session.events()):
            if type(event) is transmit_type:
                hr, resp = transmit(h, proto, list(event.apdu))
                session.handle(ev.ApduResponse(event.seq, bytes(resp)))
            elif hold is not None and type(event) is hold:
                # Session rule R10 (the re-insertion pause): the runtime would
                # answer with a timer; here, once, during the handshake.
                time.sleep(event.seconds)
                session.handle(ev.ReleaseAtr(event.token))
    scard.SCardDisconnect(h, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(ctx)


def run_bridge(endpoints: list[Endpoint], readers: list[str], verbose: bool) -> int:
    """``ccidbridge run`` with these cards: the product's Service, blocking until SIGTERM."""
    from ccidbridge.runtime.service import CardLog, Service, default_card_factory
    from lab.instant_card import InstantCard

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(created).6f %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cards = [
        ServedCard(
            label=f"bench{i}",
            endpoint=ep,
            reader=ReaderSpec(name=None if reader == "instant" else reader),
        )
        for i, (ep, reader) in enumerate(zip(endpoints, readers, strict=True))
    ]
    kinds = {c.label: r for c, r in zip(cards, readers, strict=True)}

    def factory(served: ServedCard, card_log: CardLog):  # type: ignore[no-untyped-def]
        if kinds[served.label] == "instant":
            return InstantCard()
        return default_card_factory(served, card_log)

    return Service(cards, card_factory=factory).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.servers")
    p.add_argument("mode", choices=["bridge", "floor", "echo", "relay", "session-relay"])
    p.add_argument("--endpoint", action="append", required=True, help="unix:PATH or tcp:PORT")
    p.add_argument(
        "--reader",
        action="append",
        default=[],
        help="PC/SC reader, or 'instant' (an InstantCard: no card behind the bridge)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="bridge: DEBUG log to stderr")
    args = p.parse_args(argv)
    endpoints = [parse_endpoint(e) for e in args.endpoint]
    if args.mode == "bridge":
        return run_bridge(endpoints, args.reader, args.verbose)
    try:
        if args.mode == "floor":
            run_floor(endpoints[0])
        elif args.mode == "echo":
            run_echo(endpoints[0])
        elif args.mode == "session-relay":
            run_session_relay(endpoints[0], args.reader[0])
        else:
            run_relay(endpoints[0], args.reader[0])
    except (ConnectionError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
