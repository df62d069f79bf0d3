"""Files erasekit writes: atomically (a temporary file beside the target with a name of its own, fsynced, then
renamed over it, with the user's umask), and folders held by one process at a time (advisory locks)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import BusyError


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (``.NAME.XXXXXXXX.tmp``) for the block to write; when the block ends it is
    fsynced, given the mode of the file it replaces (else ``0o666`` less the umask, like any new file) and renamed
    over ``path``. A failed block removes it; a kill can leave one, which :func:`remove_stale_temporaries` clears.
    Raises ``OSError`` when the folder cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def replace_between(path: Path, start: str, end: str, block: str) -> bool:
    """Put ``block`` between the markers ``start`` and ``end`` of the text file ``path`` (atomically, only when it
    changes); False when a marker is absent."""
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    new = head + start + block + end + rest.split(end, 1)[1]
    if new != text:
        atomic_write(path, new.encode())
    return True


def atomic_save_file(tensors: dict, metadata: dict[str, str], path: Path) -> None:
    """safetensors ``save_file`` to ``path`` atomically (see :func:`replacing`)."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files that killed runs left in ``folder`` (and below): ``*.tmp`` and the ``*.tmp.png``
    / ``*.tmp.safetensors`` of earlier versions. Call it only while holding the folder's lock."""
    for pattern in ("*.tmp", "*.tmp.png", "*.tmp.safetensors"):
        for path in Path(folder).rglob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


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
