"""The one error type of the config layer."""

from __future__ import annotations


class ConfigError(Exception):
    """A config that cannot be used.

    ``str()`` reads ``FILE:LINE: what is wrong, what is allowed``.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"
