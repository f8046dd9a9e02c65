"""``ccidbridge hook`` (run by libvirt), ``install-hook`` and ``install-unit``.

See ccidbridge.lifecycle.hook for what the hook does and when.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

from ccidbridge.lifecycle import hook as lh

UNIT_NAME = "ccidbridge@.service"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "hook", help="libvirt's qemu hook (run by libvirtd, installed by install-hook)",
        description="Called by libvirtd as /etc/libvirt/hooks/qemu.d/ccidbridge with DOMAIN "
        "OPERATION SUB-OPERATION EXTRA and the domain XML on stdin: starts the bridge of a "
        "domain whose <metadata> names a ccidbridge config, stops it when the domain stops.",
    )
    p.add_argument("domain")
    p.add_argument("operation")
    p.add_argument("sub_operation")
    p.add_argument("extra", nargs="*")
    _dirs(p)
    p.set_defaults(func=run_hook)

    p = sub.add_parser(
        "install-hook", help="install the libvirt qemu hook",
        description="Write the hook to DIR/qemu.d/ccidbridge (libvirt runs every executable "
        "there, beside an existing DIR/qemu).  libvirtd notices new hooks when it starts: "
        "restart it afterwards.",
    )
    p.add_argument("--dir", default="/etc/libvirt/hooks", type=Path,
                   help="libvirt's hook directory (default /etc/libvirt/hooks)")
    _dirs(p)
    p.set_defaults(func=run_install_hook)

    p = sub.add_parser(
        "install-unit", help="install the systemd template unit ccidbridge@.service",
        description="Write ccidbridge@.service (one instance per /etc/ccidbridge/NAME.xml: "
        "`systemctl enable --now ccidbridge@NAME`), then run `systemctl daemon-reload`.",
    )
    p.add_argument("--dir", default="/etc/systemd/system", type=Path,
                   help="unit directory (default /etc/systemd/system)")
    p.add_argument("--user", help="run the bridge as this user (default root; see "
                   "docs/lifecycle.md#H7 for the pcsc-lite 2.x polkit rule it needs)")
    p.set_defaults(func=run_install_unit)


def _dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=lh.DEFAULT_STATE_DIR, type=Path,
                   help=f"pid files of detached bridges (default {lh.DEFAULT_STATE_DIR})")
    p.add_argument("--log-dir", default=lh.DEFAULT_LOG_DIR, type=Path,
                   help=f"logs of detached bridges (default {lh.DEFAULT_LOG_DIR})")


def _template(name: str) -> str:
    return (resources.files("ccidbridge.lifecycle") / "data" / name).read_text(encoding="utf-8")


def _self_command() -> str:
    """How this very installation is started (the venv's python, not a PATH lookup)."""
    return f"{shlex.quote(sys.executable)} -m ccidbridge"


def run_hook(args: argparse.Namespace) -> int:
    from ccidbridge.config import ConfigError, load
    from ccidbridge.lifecycle.metadata import config_of
    from ccidbridge.lifecycle.sockets import now_listening, socket_file

    op, sub = args.operation, args.sub_operation
    domain_xml = sys.stdin.buffer.read()  # always drained: libvirt writes it to every hook
    if lh.decide(op, sub, True) == lh.Action() and lh.decide(op, sub, False) == lh.Action():
        return 0  # not ours to act on
    config_path = config_of(domain_xml)
    if config_path is None:
        return 0
    places = lh.Places(args.state_dir, args.log_dir)
    domain = args.domain
    unit = lh.systemd_instance(config_path)
    use_systemd = unit is not None and lh.systemd_running()
    cards = []
    if op in ("prepare", "started"):
        try:
            config = load(config_path)
        except ConfigError as exc:
            places.note(f"{domain}: not starting a bridge: {exc}")
            return 1 if op == "prepare" else 0  # prepare: libvirt refuses to start the domain
        if config.refused:
            places.note(f"{domain}: not starting a bridge: {'; '.join(config.refused)}")
            return 1 if op == "prepare" else 0
        cards = config.served_cards()
    action = lh.decide(op, sub, any(c.endpoint.bridge_listens for c in cards))
    if action.stop:
        if use_systemd:
            error = lh.systemctl("stop", f"ccidbridge@{unit}.service")
            places.note(f"{domain}: stopping ccidbridge@{unit}.service"
                        + (f" failed: {error}" if error else ""))
        else:
            pid = lh.stop_detached(domain, places)
            if pid is not None:
                places.note(f"{domain}: stopped the bridge (pid {pid})")
        return 0
    if not action.start:
        return 0
    before = [socket_file(c.endpoint.path or "") for c in cards]
    if use_systemd:
        error = lh.systemctl("start", f"ccidbridge@{unit}.service")
        if error:
            places.note(f"{domain}: cannot start ccidbridge@{unit}.service: {error}")
            return 1 if op == "prepare" else 0
        places.note(f"{domain}: started ccidbridge@{unit}.service for {config_path}; its log: "
                    f"journalctl -u ccidbridge@{unit}")
    else:
        pid = lh.start_detached(domain, config_path, places)
        places.note(f"{domain}: started the bridge for {config_path} (pid {pid}); its log: "
                    f"{places.log_file(domain)}")
    if action.wait_listening:
        deadline = time.monotonic() + lh.LISTEN_WAIT
        for card, old in zip(cards, before, strict=True):
            while card.endpoint.bridge_listens and not now_listening(card.endpoint, old):
                if time.monotonic() > deadline:
                    places.note(f"{domain}: the bridge does not listen on "
                                f"{card.endpoint.describe()} after {lh.LISTEN_WAIT:g} s; "
                                "QEMU may fail to connect (see the bridge's log)")
                    return 0
                time.sleep(0.02)
    return 0


def _install(target: Path, text: str, mode: int) -> bool:
    """Write ``target`` whole (a temporary file renamed into place), or say why not."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(mode)
        tmp.rename(target)
    except OSError as exc:
        print(f"ccidbridge: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def run_install_hook(args: argparse.Namespace) -> int:
    text = (_template("qemu-hook.in")
            .replace("@PYTHON@", shlex.quote(sys.executable))
            .replace("@STATE_DIR@", shlex.quote(str(args.state_dir)))
            .replace("@LOG_DIR@", shlex.quote(str(args.log_dir))))
    target = args.dir / "qemu.d" / "ccidbridge"
    if not _install(target, text, 0o755):
        return 1
    print(f"installed {target}; restart libvirtd so it sees the hook "
          "(`systemctl restart libvirtd`)")
    return 0


def run_install_unit(args: argparse.Namespace) -> int:
    user = f"User={args.user}\nGroup={args.user}\n" if args.user else ""
    text = _template(f"{UNIT_NAME}.in").replace("@EXEC@", _self_command()) \
        .replace("@USER@\n", user)
    target = args.dir / UNIT_NAME
    if not _install(target, text, 0o644):
        return 1
    print(f"installed {target}; now `systemctl daemon-reload` and, per config "
          "/etc/ccidbridge/NAME.xml, `systemctl enable --now ccidbridge@NAME`")
    return 0
