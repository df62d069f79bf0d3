"""Advisory locks (``fcntl.flock``), so that two erasekit processes never write one folder at the same time."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block.

    Does not wait: if another process holds it, ``BusyError`` names ``what`` and the lock file. The lock goes
    with the process (a killed run leaves no stale lock); the file itself is left in place.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{what} is in use by another erasekit process (lock {path}); "
                            "wait for it or choose another folder") from None
        yield
    finally:
        os.close(fd)
