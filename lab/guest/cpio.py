"""A minimal writer for the initramfs "newc" cpio format.

Writing the archive ourselves (instead of ``find | cpio -o``) means the build
needs no root: device nodes such as /dev/console are just header fields, not
files that ``mknod`` would have to create on the host.  The output is also
byte-for-byte reproducible (mtime 0, uid/gid 0, inode numbers in order).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

_TRAILER = "TRAILER!!!"


@dataclass
class CpioWriter:
    """Collects entries in memory and serialises them with :meth:`getvalue`."""

    _chunks: list[bytes] = field(default_factory=list)
    _ino: int = 1
    _seen: set[str] = field(default_factory=set)

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self._chunks.append(header + encoded + _pad(len(header) + len(encoded)))
        self._chunks.append(data + _pad(len(data)))

    def directory(self, name: str) -> None:
        """Add a directory and, first, every missing parent."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._add("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents are created)."""
        self._parent(name)
        self._add(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name -> target``."""
        self._parent(name)
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (no root needed: it is only a header)."""
        self._parent(name)
        self._add(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def _parent(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)

    def getvalue(self) -> bytes:
        """The archive including the trailer."""
        trailer = CpioWriter(_ino=0)
        trailer._add(_TRAILER, 0)
        return b"".join(self._chunks + trailer._chunks)


def _pad(length: int) -> bytes:
    """newc aligns headers+names and file data to 4 bytes."""
    return b"\0" * (-length % 4)
