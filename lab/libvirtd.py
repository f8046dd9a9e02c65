"""A throwaway libvirtd (libvirt 9.0, QEMU driver) used as an oracle by the tests.

It only ever runs inside ``.ci/isolated``'s private mount namespace, and
before it starts it hides every path libvirtd writes to behind private
throwaway directories, so the machine's own libvirt configuration, state,
users and groups are never touched:

* ``/etc/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt`` and
  ``/var/log/libvirt`` get private directories bind-mounted over them (when a
  mount point does not exist, its parent first gets a private overlay so the
  mount point is created in the namespace only);
* ``/etc/passwd`` and ``/etc/group`` get private copies with the
  ``libvirt-qemu`` user and group appended (the QEMU driver refuses to load
  without them: "Failed to parse user 'libvirt-qemu'");
* ``/run/libvirt`` is already private (``.ci/isolated`` mounts a tmpfs on /run).

The daemon is started with ``-f CONF -p PIDFILE`` and stopped by its PID.  It
runs under a small reaper (this module's ``__main__``, a child subreaper):
libvirt daemonizes every QEMU it starts, including the capability probes, and
the orphans would otherwise go to the namespace's PID 1 (pytest), which never
reaps them; libvirt then waits 2 x 40 s for each zombie to die ("Failed to
terminate process N with SIGKILL: Device or resource busy") -- that made the
cold start take 160 s and every ``virsh destroy`` 80 s.
The QEMU capabilities cache (8.5 s to build from scratch) may live in a
persistent directory; libvirt itself revalidates it against the binaries.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import child_env
from lab.stacks import HOST, Stack

URI = "qemu:///system"
PRIVATE_DIRS = ("/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
stdio_handler = "file"
"""


class LibvirtdError(RuntimeError):
    """libvirtd could not be set up, started or queried."""


def isolation_problem(stack: Stack = HOST) -> str | None:
    """Why it is unsafe (or impossible) to start ``stack``'s libvirtd here, or None."""
    if os.environ.get("CCIDBRIDGE_ISOLATED") != "1":
        return (
            "libvirtd is only started inside .ci/isolated (CCIDBRIDGE_ISOLATED=1); run "
            "`.ci/isolated .venv/bin/pytest ...` so the machine's libvirt is never touched"
        )
    if os.geteuid() != 0:
        return "libvirtd (qemu:///system) needs root inside .ci/isolated"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        if not any(" /run " in line and "ccidbridge-run" in line for line in f):
            return "CCIDBRIDGE_ISOLATED=1 but /run is not .ci/isolated's private tmpfs"
    if not stack.is_host:
        return stack.problem()
    for tool in ("libvirtd", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (see .ci/debian-packages)"
    return None


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LibvirtdError(f"{' '.join(argv)}: {proc.stderr.strip()}")


@dataclass
class PrivateMounts:
    """The mounts that hide the machine's libvirt paths; undone in reverse order."""

    root: Path
    mounted: list[str] = field(default_factory=list)

    def bind(self, source: Path, target: str) -> None:
        _run("mount", "--bind", str(source), target)
        self.mounted.append(target)

    def overlay_parent(self, target: str) -> None:
        """Give ``target``'s parent a private copy-on-write overlay so ``target`` can be created."""
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            self.overlay_parent(parent)
            os.mkdir(parent)
            return
        base = self.root / ("overlay" + parent.replace("/", "_"))
        (base / "upper").mkdir(parents=True)
        (base / "work").mkdir()
        _run(
            "mount", "-t", "overlay", "ccidbridge-overlay", "-o",
            f"lowerdir={parent},upperdir={base / 'upper'},workdir={base / 'work'}", parent,
        )
        self.mounted.append(parent)

    def undo(self) -> None:
        while self.mounted:
            target = self.mounted.pop()
            subprocess.run(["umount", "-l", target], capture_output=True)


def _with_libvirt_qemu(original: str, line: str) -> str:
    text = Path(original).read_text(encoding="utf-8")
    if any(entry.split(":", 1)[0] == "libvirt-qemu" for entry in text.splitlines()):
        return text
    return text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"


def make_private(root: Path, cache_dir: Path | None, stack: Stack = HOST) -> PrivateMounts:
    """Hide ``stack``'s libvirt paths (see the module docstring) behind ``root``.

    In a Debian 13 / sid root the same mounts go onto the root's paths (its
    /var/lib/libvirt is already a private tmpfs, lab.stacks.Stack.enter).
    """
    mounts = PrivateMounts(root)
    try:
        for inside in PRIVATE_DIRS:
            target = str(stack.path(inside))
            if inside == "/var/cache/libvirt" and cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                private = cache_dir
            else:
                private = root / target.strip("/").replace("/", "_")
                private.mkdir(parents=True)
            if not os.path.isdir(target):
                if stack.is_host:
                    mounts.overlay_parent(target)
                os.makedirs(target, exist_ok=True)
            mounts.bind(private, target)
        # Chrooted, "/" is no mount point, so the per-domain mount namespace libvirt
        # gives QEMU fails ("Failed disable mount propagation out of the root
        # filesystem: Invalid argument", docs/lab.md#V21): the roots' libvirtd goes without.
        conf = QEMU_CONF if stack.is_host else QEMU_CONF + "namespaces = []\n"
        stack.path("/etc/libvirt/qemu.conf").write_text(conf, encoding="utf-8")
        passwd = root / "passwd"
        group = root / "group"
        passwd.write_text(
            _with_libvirt_qemu(
                str(stack.path("/etc/passwd")),
                "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin",
            ),
            encoding="utf-8",
        )
        group.write_text(
            _with_libvirt_qemu(str(stack.path("/etc/group")), "libvirt-qemu:x:64055:"),
            encoding="utf-8",
        )
        mounts.bind(passwd, str(stack.path("/etc/passwd")))
        mounts.bind(group, str(stack.path("/etc/group")))
    except BaseException:
        mounts.undo()
        raise
    return mounts


class Libvirtd:
    """One libvirtd process with private state; use as a context manager.

    ``stack`` picks whose libvirtd (and so whose QEMU) runs: this machine's
    libvirt 9.0, or libvirt 11.3 / 12.8 chrooted in a Debian root (lab.stacks).
    """

    def __init__(self, cache_dir: Path | None = None, start_timeout: float = 60.0,
                 stack: Stack = HOST) -> None:
        self.cache_dir = cache_dir
        self.start_timeout = start_timeout
        self.stack = stack
        self.root = Path("/nonexistent")  # a private dir under the stack's /run, at start
        self.log = self.root / "libvirtd.log"
        self.pid: int | None = None
        self._mounts: PrivateMounts | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Libvirtd:
        problem = isolation_problem(self.stack)
        if problem:
            raise LibvirtdError(problem)
        self.stack.enter()
        self.root = Path(tempfile.mkdtemp(prefix="ccidbridge-libvirtd-",
                                          dir=self.stack.path("/run")))
        self.log = self.root / "libvirtd.log"
        self._mounts = make_private(self.root / "private", self.cache_dir, self.stack)
        self.hooks_dir.mkdir(exist_ok=True)
        self._start_daemon()
        return self

    @property
    def hooks_dir(self) -> Path:
        """libvirt's hook directory, inside the private /etc/libvirt (of the stack's root)."""
        return self.stack.path("/etc/libvirt/hooks")

    def _start_daemon(self) -> None:
        inside = self.stack.inside
        conf = self.root / "libvirtd.conf"
        conf.write_text(
            f'log_level = 3\nlog_outputs = "3:file:{inside(self.log)}"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n',
            encoding="utf-8",
        )
        pidfile = self.root / "libvirtd.pid"
        with open(self.root / "libvirtd.stdout", "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "lab.libvirtd",
                 *self.stack.command(["libvirtd", "-f", inside(conf), "-p", inside(pidfile)])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        self.pid = self._proc.pid
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                self.stop()
                raise LibvirtdError(f"libvirtd exited at start; see {self.root}")
            probe = subprocess.run(self.stack.command(["virsh", "-c", URI, "version"]),
                                   capture_output=True)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise LibvirtdError(f"libvirtd not ready after {self.start_timeout} s")
            time.sleep(0.2)

    def _stop_daemon(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            running = self.virsh("list", "--name").stdout.split()
            for name in running:  # the reaper waits for every QEMU libvirt started
                self.destroy(name)
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop the daemon (and its domains) and start it again on the same private
        state: libvirtd looks for hooks (:attr:`hooks_dir`) only when it starts."""
        self._stop_daemon()
        self._start_daemon()

    def stop(self) -> None:
        self._stop_daemon()
        if self._mounts is not None:
            self._mounts.undo()
            self._mounts = None
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c qemu:///system ARGS`` (never raises on a non-zero exit)."""
        return subprocess.run(self.stack.command(["virsh", "-c", URI, *args]),
                              capture_output=True, text=True)

    def _xml_file(self, xml: str) -> str:
        fd, path = tempfile.mkstemp(suffix=".xml", dir=self.root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(xml)
        return self.stack.inside(path)

    def domxml_to_native(self, domain_xml: str) -> subprocess.CompletedProcess[str]:
        """``virsh domxml-to-native qemu-argv``: the one-line shell-quoted argv."""
        return self.virsh("domxml-to-native", "qemu-argv", self._xml_file(domain_xml))

    def define_dumpxml(self, domain_xml: str, name: str) -> subprocess.CompletedProcess[str]:
        """``virsh define`` then ``dumpxml --inactive``, then undefine; the normalized XML."""
        defined = self.virsh("define", self._xml_file(domain_xml))
        if defined.returncode != 0:
            return defined
        try:
            return self.virsh("dumpxml", "--inactive", name)
        finally:
            self.virsh("undefine", name)

    def create(self, domain_xml: str) -> subprocess.CompletedProcess[str]:
        """``virsh create``: start a transient domain (stop it with ``destroy``)."""
        return self.virsh("create", self._xml_file(domain_xml))

    def destroy(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.virsh("destroy", name)

    def qemu_log(self, name: str) -> str:
        """The domain's QEMU log (argv and stderr), from the private /var/log/libvirt."""
        try:
            return self.stack.path(f"/var/log/libvirt/qemu/{name}.log").read_text(
                errors="replace")
        except OSError:
            return ""


PR_SET_CHILD_SUBREAPER = 36


def reap_main(argv: list[str]) -> int:
    """Run ``argv`` as a child subreaper: reap every orphan, forward SIGTERM/SIGINT.

    Exits with the child's status once the child (libvirtd) is gone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("ccidbridge reaper: prctl(PR_SET_CHILD_SUBREAPER) failed", file=sys.stderr)
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        if child.returncode is None:
            os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while True:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            return status
        except InterruptedError:
            continue
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(raw)
            status = child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(reap_main(sys.argv[1:]))
