"""An exclusive lock on a folder (a cache or a run folder) held by one process at a time.

The lock is `flock` on the folder itself, not a lock file: a file inside a Zarr group would be
reported by zarr as a stray object, and the kernel drops the lock when its process dies (even by
SIGKILL), so a crashed writer never leaves a stale lock behind. Where `fcntl` does not exist
(Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


class FolderLock:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self, wait: bool, on_wait=None) -> bool:
        """Take the lock. With wait=False return False at once if another process holds it;
        with wait=True call on_wait() once, then block until it is free."""
        if fcntl is None:
            return True
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                return False
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def check(self) -> None:
        """Nothing to check: the kernel never takes a held flock away (a lease can run out)."""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
