"""What ``ccidbridge run`` serves from a config, and what it leaves alone (and why)."""

from __future__ import annotations

from ccidbridge.config.layout import Layout, PlacedCard
from ccidbridge.config.loaded import Config
from ccidbridge.spec import ApduPolicy, Endpoint, PinGuardSpec, ReaderSpec, ServedCard, is_loopback

TLS_REASON = (
    "tls='yes' needs the bridge's own certificates: add <tls dir='/DIR'/> (QEMU's layout: "
    "ca-cert.pem plus client-cert.pem + client-key.pem, or server-*.pem when QEMU connects)"
)
#: Safety: never a card in clear text on a network by accident (a refusal, not a skip).
CLEARTEXT_REASON = (
    "host='{host}' is not loopback and the chardev has no TLS: every command, PINs included, "
    "would cross the network in clear text; use tls='yes' with <tls dir='...'/>, a Unix "
    "socket forwarded over ssh, or add <cleartext network='yes'/> to accept that"
)
_NOT_A_SOCKET = {
    "pty": "a pty chardev has no socket for the bridge to reach (use tcp or unix)",
    "file": "a file chardev only writes what QEMU sends; nobody can answer the card",
    "pipe": "a pipe chardev is not a socket the bridge can open (use tcp or unix)",
    "dev": "a host device chardev (tty) is not a socket the bridge can open",
    "null": "a null chardev discards everything; the card can never answer",
    "vc": "a vc chardev is QEMU's own console, not a socket",
    "stdio": "a stdio chardev is QEMU's own terminal, not a socket",
    "udp": "the bridge speaks VSCard over stream sockets; udp can lose or reorder frames",
    "spicevmc": "the SPICE client (e.g. remote-viewer) relays this card, not ccidbridge",
    "spiceport": "a spiceport chardev is relayed by the SPICE client, not ccidbridge",
}


def label(path: str, placed: PlacedCard) -> str:
    return f"{path}:{placed.card.line} {placed.alias}"


def _why_not(placed: PlacedCard) -> str | None:
    card = placed.card
    if card.mode == "host":
        return "mode='host': QEMU emulates the card from the host's NSS database by itself"
    if card.mode == "host-certificates":
        return "mode='host-certificates': QEMU emulates the card from three NSS certificates"
    chardev = card.chardev
    assert chardev is not None
    if chardev.type in _NOT_A_SOCKET:
        return f"type='{chardev.type}': {_NOT_A_SOCKET[chardev.type]}"
    src = chardev.source
    assert src is not None
    if chardev.type == "tcp" and src.tls and card.tls is None:
        return TLS_REASON
    if _cleartext_refused(placed):
        return CLEARTEXT_REASON.format(host=src.host)
    if chardev.protocol == "telnet":
        return "protocol type='telnet': QEMU wraps the stream in telnet; the bridge speaks raw"
    return None


def _cleartext_refused(placed: PlacedCard) -> bool:
    card = placed.card
    chardev = card.chardev
    if chardev is None or chardev.type != "tcp" or chardev.source is None:
        return False
    src = chardev.source
    return not src.tls and not is_loopback(src.host) and not card.cleartext_network


def refusals(path: str, lay: Layout) -> tuple[str, ...]:
    """``FILE:LINE: message`` for every card the bridge refuses to serve for safety:
    ``check`` and ``run`` treat these as config errors (exit 2)."""
    out = []
    for placed in lay.cards:
        if _cleartext_refused(placed):
            src = placed.card.chardev.source  # type: ignore[union-attr]
            assert src is not None
            out.append(f"{path}:{placed.card.line}: "
                       + CLEARTEXT_REASON.format(host=src.host))
    return tuple(out)


def _endpoint(placed: PlacedCard) -> Endpoint:
    chardev = placed.card.chardev
    assert chardev is not None and chardev.source is not None
    src = chardev.source
    listens = src.mode == "connect"
    if chardev.type == "unix":
        return Endpoint(kind="unix", bridge_listens=listens, path=src.path)
    return Endpoint(kind="tcp", bridge_listens=listens, host=src.host, port=src.port,
                    tls=placed.card.tls)


def served_cards(path: str, lay: Layout) -> tuple[ServedCard, ...]:
    """The cards ``run`` serves (the config at ``path``, laid out as ``lay``)."""
    out = []
    for placed in lay.cards:
        if _why_not(placed) is None:
            card = placed.card
            out.append(ServedCard(
                label=label(path, placed),
                endpoint=_endpoint(placed),
                reader=card.reader or ReaderSpec(line=card.line),
                pin_guard=card.pin_guard or PinGuardSpec(line=card.line),
                policy=card.policy or ApduPolicy(),
                source_file=path,
                line=card.line,
            ))
    return tuple(out)


def unserved(path: str, lay: Layout) -> tuple[tuple[str, str], ...]:
    """``(label, reason)`` of every device ``run`` leaves alone."""
    out = []
    for placed in lay.cards:
        why = _why_not(placed)
        if why is not None:
            out.append((label(path, placed), why))
    for ch in lay.channels:
        out.append((f"{path}:{ch.channel.line} {ch.alias}",
                    "a spicevmc channel carries the SPICE agent (clipboard, resolution), "
                    "not a smartcard"))
    return tuple(out)


def notes(config: Config) -> list[str]:
    """What the user must know when pasting the output (not errors)."""
    lay = config.layout
    out = []
    spice = [f"line {p.card.line}" for p in lay.cards
             if p.card.chardev and p.card.chardev.type in ("spicevmc", "spiceport")]
    spice += [f"line {c.channel.line}" for c in lay.channels]
    if spice:
        out.append(
            f"spicevmc/spiceport ({', '.join(spice)}) need <graphics type='spice'> in the "
            "domain (libvirt: chardev 'spicevmc' not supported without spice graphics)"
        )
    if lay.extra_cards:
        out.append(
            f"{len(lay.cards)} cards: libvirt 9.0 takes one <smartcard>; `ccidbridge libvirt` "
            f"gives the other {len(lay.extra_cards)} their own <controller type='ccid'> and "
            "passes them to QEMU in <qemu:commandline>"
        )
    exposed = [f"line {p.card.line}" for p in lay.cards if p.card.cleartext_network]
    if exposed:
        out.append(
            f"{', '.join(exposed)}: served in clear text on a network address "
            "(<cleartext network='yes'/>): anyone on the path sees every command, PINs included"
        )
    if lay.cards or lay.controllers:
        out.append(
            "the domain needs a USB controller (not model='none'; libvirt: USB is disabled for "
            "this domain, but USB devices are present in the domain XML)"
        )
    return out
