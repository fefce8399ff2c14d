"""One writer per kernel store: a lock file created atomically (``O_CREAT | O_EXCL``)
holding the writer's process id, host and start time, removed when the writer is done.

A second writer (another process, or a second call in this one) is refused with a
`ntkit.errors.StoreError` naming the lock file and its holder. A lock left by a
process that no longer runs on this host (``kill -9``, a crash) is stale and taken
over; one from another host cannot be checked from here, and its message says how to
clear it by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from ..errors import StoreError

__all__ = ["LOCK_NAME", "StoreLock"]

#: The lock file's name inside a store.
LOCK_NAME = "ntkit.lock"


class StoreLock:
    """The writer's lock on the store at ``path``: `acquire`, then `release`."""

    def __init__(self, path: Path):
        self.store = path
        self.file = path / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        """Creates the lock file, taking over a stale one once.

        Raises:
            StoreError: another writer holds the lock (fix ``"lock"``).
        """
        for _ in range(2):
            if self._create():
                return
            holder = _read(self.file)
            if holder is None:  # removed between our try and the read: try again
                continue
            if not _stale(holder) or not self._take_over(holder):
                raise StoreError(self.store, self._held_by(holder), "lock")
        raise StoreError(self.store, self._held_by(_read(self.file) or {}), "lock")

    def release(self) -> None:
        """Removes the lock file if this writer holds it (and it is still ours)."""
        if not self.held:
            return
        self.held = False
        holder = _read(self.file)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()

    def _create(self) -> bool:
        self.token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        self.held = True
        return True

    def _take_over(self, holder: dict) -> bool:
        """Moves the stale lock ``holder`` aside; False if another writer's live lock was
        there by then (put back)."""
        aside = self.file.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.file, aside)
        except FileNotFoundError:
            return True  # someone else removed it: try to create ours
        if _read(aside) != holder:  # a writer took it over between our read and the move
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.file)  # back in place, unless a third writer holds it
            aside.unlink()
            return False
        aside.unlink()
        return True

    def _held_by(self, holder: dict) -> str:
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
               f"{holder.get('started', '?')}")
        return (f"is being written by another writer: its lock file {str(self.file)!r} is held "
                f"by {who}. If that process has ended (a crash, or killed on another host), "
                f"delete the lock file")


def _read(file: Path) -> dict | None:
    """The lock's record; None if there is no lock file, ``{}`` if it is unreadable (a
    writer between creating and filling it, or not a lock of ntkit's)."""
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _stale(holder: dict) -> bool:
    """Whether ``holder`` is a process of this host that no longer runs."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # another call in this process holds it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
