"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

The data goes to a temporary file in the destination directory (same filesystem, so the rename is
atomic), which is fsynced, renamed over the destination, and the directory fsynced so the rename
itself survives a crash. On any failure the temporary file is removed and the destination untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_directory"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, temp_prefix: str | None = None, suffix: str = ".tmp"):
    """Yield a binary file object whose contents replace ``path`` when the block exits normally.

    ``temp_prefix`` names the temporary file (default ``.<name>.``), e.g. so that a caller can find
    and remove leftovers of a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix or f".{path.name}.", suffix=suffix)
    try:
        # mkstemp creates the file 0600; the result should be as readable as any file this process
        # writes (0644 under the usual umask 022), e.g. a run shared with other users
        os.chmod(temp_name, 0o666 & ~_current_umask())
        with os.fdopen(descriptor, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened; the rename is durable there anyway
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
