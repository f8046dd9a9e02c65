"""A private sshd and an ``ssh -L`` forward of a Unix socket, for the remote-use test.

Everything lives in one work directory: the sshd config, its host key, the
client key and authorized_keys, known_hosts, the pid file and the logs.  sshd
listens on 127.0.0.1 on a free port and is started and stopped by PID; the
machine's /etc/ssh is never read (``-f`` our config, ``-h`` our host key) and
the client reads no user config (``-F none``).  Run inside ``.ci/isolated``:
sshd wants /run/sshd (its privilege separation directory), which is made in
the namespace's private /run.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

from lab.process import reap
from lab.qemu import free_tcp_port, tcp_listening

SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"


class SshError(Exception):
    pass


def _keygen(path: Path) -> None:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "ccidbridge-lab",
                    "-f", str(path)], check=True, capture_output=True)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class PrivateSshd:
    """sshd on 127.0.0.1:``port`` accepting only this directory's client key."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.port = free_tcp_port()
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.forwards: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 10.0) -> PrivateSshd:
        for tool in (SSHD, SSH, SSH_KEYGEN):
            if not Path(tool).exists():
                raise SshError(f"{tool} not installed (openssh-server, openssh-client)")
        _keygen(self.host_key)
        _keygen(self.client_key)
        shutil.copy(f"{self.client_key}.pub", self.dir / "authorized_keys")
        pub = Path(f"{self.host_key}.pub").read_text().split()
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "AllowStreamLocalForwarding yes\n"
            "AllowTcpForwarding local\n"  # OpenSSH 9.2 also gates -L of a Unix socket on it

            "X11Forwarding no\n"
            "LogLevel VERBOSE\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not tcp_listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SshError(f"sshd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def forward_local(self, local: str, remote: str, timeout: float = 10.0
                      ) -> subprocess.Popen[bytes]:
        """``ssh -N -L LOCAL:REMOTE``: the ssh client listens on ``local`` (a Unix
        socket it creates, as this user) and connects each client through sshd
        to ``remote``."""
        log = open(self.dir / f"ssh-{len(self.forwards)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [SSH, "-F", "none", "-N", "-i", str(self.client_key), "-p", str(self.port),
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
             "-o", "StrictHostKeyChecking=yes", "-o", "ExitOnForwardFailure=yes",
             "-o", "StreamLocalBindUnlink=yes", "-o", "StreamLocalBindMask=0177",
             "-L", f"{local}:{remote}", "root@127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        self.forwards.append(proc)
        deadline = time.monotonic() + timeout
        while not _is_socket(local):  # not by connecting: that would open a forward
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (self.dir / f"ssh-{len(self.forwards) - 1}.log").read_text()
                raise SshError(f"ssh -L did not come up: {text[-2000:]}")
            time.sleep(0.02)
        return proc

    def close(self) -> None:
        for proc in self.forwards:
            reap(proc)
        self.forwards.clear()
        reap(self.proc)
        self.proc = None
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> PrivateSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PrivateSshd", "SshError"]
