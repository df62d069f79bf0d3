"""Advisory locks on results folders, so that two erasekit processes never work on the same files at once."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError


@contextmanager
def exclusive_lock(path: Path, what: str):
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the block; raise :class:`BusyError`
    at once, without waiting, when another process holds it. The lock dies with its process (a kill frees it)."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{what} is in use by another erasekit process (lock {path}); wait for it or choose "
                            "another folder") from None
        yield
    finally:
        os.close(fd)
