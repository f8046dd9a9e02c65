"""A private GnuPG home that talks to cards through pcscd, for tests on the host.

* ``scdaemon.conf``: ``disable-ccid`` and ``pcsc-driver`` (libpcsclite), so
  scdaemon uses pcscd like every other PC/SC client and never opens USB
  readers itself (docs/middleware-facts.md#M10).
* ``gpg-agent.conf``: our own pinentry — a shell script that answers GETPIN
  with the PIN in ``pin`` (written by :meth:`GnupgHome.set_pin`), so signing
  with the card needs no terminal.  The PIN never reaches a log.
* The agent is started by us (``--daemon --no-detach``, so its PID is ours)
  and stopped by PID after ``gpgconf --kill scdaemon``.  The home lives under
  /tmp with a short name: the agent's sockets are created in it when there is
  no /run/user (as in ``.ci/isolated``) and a Unix socket path has at most
  107 bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from lab.process import reap

PCSC_LIB = "/usr/lib/x86_64-linux-gnu/libpcsclite.so.1"

PINENTRY = """#!/bin/sh
# Assuan pinentry for tests: every GETPIN gets the PIN in the file next to us.
echo "OK pinentry for tests"
while read -r cmd rest; do
    case "$cmd" in
        GETPIN) printf 'D %s\\nOK\\n' "$(cat "$(dirname "$0")/pin")" ;;
        BYE) echo OK; exit 0 ;;
        *) echo OK ;;
    esac
done
"""


def verify_detached(public_key: bytes, signature: Path, data: Path) -> str | None:
    """Verify ``signature`` over ``data`` in a fresh home that holds only
    ``public_key`` (an exported key): the signer's fingerprint (VALIDSIG), or None."""
    with GnupgHome() as fresh:
        key = fresh.path / "key.asc"
        key.write_bytes(public_key)
        fresh.gpg("--import", str(key), check=True)
        r = fresh.gpg("--status-fd", "1", "--verify", str(signature), str(data))
    m = re.search(r"^\[GNUPG:\] VALIDSIG ([0-9A-F]{40})", r.stdout, re.M)
    return m.group(1) if r.returncode == 0 and m else None


class GnupgHome:
    """``GNUPGHOME`` in a fresh temp dir, with an agent of our own.  Use as a context manager."""

    def __init__(self, *, scd_log: bool = False, base: str | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="gpg-", dir=base or "/tmp"))
        self.path.chmod(0o700)
        self.scd_log = scd_log
        self.agent: subprocess.Popen[bytes] | None = None
        pinentry = self.path / "pinentry.sh"
        pinentry.write_text(PINENTRY)
        pinentry.chmod(0o700)
        (self.path / "gpg-agent.conf").write_text(
            f"pinentry-program {pinentry}\nallow-loopback-pinentry\n"
        )
        scd = f"disable-ccid\npcsc-driver {PCSC_LIB}\n"
        if scd_log:  # no debug flags: scdaemon's cardio debug would log PINs
            scd += f"log-file {self.path / 'scdaemon.log'}\nverbose\n"
        (self.path / "scdaemon.conf").write_text(scd)
        self.set_pin("")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, GNUPGHOME=str(self.path), LC_ALL="C")
        env.pop("GPG_AGENT_INFO", None)
        return env

    def set_pin(self, pin: str) -> None:
        p = self.path / "pin"
        p.write_text(pin)
        p.chmod(0o600)

    def start_agent(self, timeout: float = 10.0) -> None:
        log = open(self.path / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.agent = subprocess.Popen(
                ["gpg-agent", "--homedir", str(self.path), "--daemon", "--no-detach"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(
                ["gpg-connect-agent", "--no-autostart", "/bye"],
                env=self.env, capture_output=True, timeout=timeout,
            )  # fmt: skip
            if r.returncode == 0:
                return
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gpg-agent did not start: {self.tail('agent.log')}")
            time.sleep(0.05)

    def run(
        self, *args: str, input: bytes | None = None, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """A GnuPG tool (``gpg``, ``gpg-connect-agent``, …) in this home; text output."""
        r = subprocess.run(
            list(args), input=input, env=self.env, capture_output=True, timeout=timeout,
        )  # fmt: skip
        out = subprocess.CompletedProcess(
            r.args, r.returncode, r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"),
        )  # fmt: skip
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(args)}: rc {r.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def gpg(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("gpg", "--batch", "--no-tty", *args, **kw)  # type: ignore[arg-type]

    def agent_cmd(self, *lines: str) -> subprocess.CompletedProcess[str]:
        return self.run("gpg-connect-agent", "--no-autostart", *lines, "/bye")

    def learn_card(self) -> dict[str, str]:
        """``gpg --card-status`` (the agent learns the card and writes its key stubs),
        then the keygrip of each card key: ``{"OPENPGP.1": grip, ...}``."""
        self.gpg("--card-status", check=True)
        learn = self.agent_cmd("SCD LEARN --force")
        grips = dict(
            (ref, grip) for grip, ref in re.findall(r"KEYPAIRINFO (\w{40}) (\S+)", learn.stdout)
        )
        if not grips:
            raise RuntimeError(f"no card keys learnt: {learn.stdout}{learn.stderr}")
        return grips

    def key_from_card(self, grip: str, created: int, name: str = "ccidbridge test card") -> str:
        """An OpenPGP primary key (RSA, sign) made from the card key ``grip``, with the
        card's key time ``created``, so its fingerprint is the card's
        (docs/middleware-facts.md#M11).
        The self-signature is made by the card: set the PIN first.  Returns the fingerprint."""
        when = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
        params = (
            f"Key-Type: RSA\nKey-Grip: {grip}\nKey-Usage: sign\nName-Real: {name}\n"
            f"Expire-Date: 0\nCreation-Date: {when}\n%no-protection\n%commit\n"
        )
        self.gpg("--gen-key", input=params.encode(), check=True)
        listing = self.gpg("--with-colons", "--list-keys", check=True).stdout
        fprs = re.findall(r"^fpr:+([0-9A-F]{40}):", listing, re.M)
        if len(fprs) != 1:
            raise RuntimeError(f"expected one key, got {fprs}")
        return fprs[0]

    def tail(self, name: str, n: int = 4000) -> str:
        try:
            return (self.path / name).read_text(errors="replace")[-n:]
        except OSError:
            return f"(no {name})"

    def close(self) -> None:
        if self.agent is not None:
            subprocess.run(
                ["gpgconf", "--homedir", str(self.path), "--kill", "scdaemon"],
                env=self.env, capture_output=True, timeout=10,
            )  # fmt: skip
            agent, self.agent = self.agent, None
            # SIGTERM makes the agent wait for its clients; a second one ends it.
            agent.send_signal(signal.SIGTERM)
            reap(agent, signal.SIGTERM, 5.0)
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> GnupgHome:
        self.start_agent()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
