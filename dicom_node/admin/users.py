"""The admin users: ``NAME:HASH`` lines in ``admin.users_file`` (mode 0600), the hash an argon2id
PHC string (argon2-cffi's defaults).  ``coronet admin user add NAME`` writes it; the admin
service reads it again whenever it changes, so a new user can log in without a restart.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dicom_node.core.durable import replace_text
from dicom_node.core.errors import ConfigError

USER_NAME: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD: Final = 8
_HASHER: Final = PasswordHasher()


def check_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise ConfigError(
            f"user name {name!r}: 1-64 letters, digits and _ . @ -", [("name", "invalid")]
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ConfigError(
            f"a password has at least {MIN_PASSWORD} characters", [("password", "too short")]
        )
    if "\n" in password or "\r" in password:
        raise ConfigError("a password is one line", [("password", "invalid")])
    return password


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int


class UserStore:
    """Read, verify and edit the users file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._users: dict[str, str] = {}
        self._dummy = _HASHER.hash("not a password of anyone")

    def users(self) -> dict[str, str]:
        """User name -> hash, read again when the file changed."""
        with self._lock:
            try:
                info = self.path.stat()
            except FileNotFoundError:
                self._users, self._stamp = {}, None
                return {}
            stamp = _Stamp(info.st_mtime_ns, info.st_size)
            if stamp != self._stamp:
                self._users = _parse(self.path.read_text(encoding="utf-8"))
                self._stamp = stamp
            return dict(self._users)

    def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s; an unknown name costs the same time."""
        stored = self.users().get(name)
        try:
            return _HASHER.verify(stored or self._dummy, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    def add(self, name: str, password: str) -> bool:
        """Add ``name`` or set a new password; True when the user is new."""
        check_name(name)
        check_password(password)
        users = self.users()
        new = name not in users
        users[name] = _HASHER.hash(password)
        self._write(users)
        return new

    def remove(self, name: str) -> None:
        users = self.users()
        if name not in users:
            raise ConfigError(f"no user {name!r} in {self.path}", [("name", "not found")])
        del users[name]
        self._write(users)

    def _write(self, users: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{name}:{digest}\n" for name, digest in sorted(users.items()))
        replace_text(self.path, text, new_mode=0o600)


def _parse(text: str) -> dict[str, str]:
    users = {}
    for line in text.splitlines():
        name, sep, digest = line.strip().partition(":")
        if sep and USER_NAME.match(name) and digest.startswith("$argon2"):
            users[name] = digest
    return users


__all__ = ["UserStore", "check_name", "check_password"]
