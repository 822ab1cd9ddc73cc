"""One exception type for every error a user can fix, and the one line the CLI prints for it.

The library raises `SherlError` with a message that names the file, field or option at fault and
how to fix it; `cli.py` prints that one line and exits non-zero. What the operating system refuses
(a full disk, a read-only folder) arrives as `OSError` and is printed as one line too, naming the
path. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno


class SherlError(Exception):
    """A problem with the user's input, files or request (never a bug in sherl-pipe)."""


class CacheMismatch(SherlError):
    """An existing cache was made for a different request (other model, data or settings)."""

    def __init__(self, message: str, diffs: list | None = None):
        super().__init__(message)
        self.diffs = diffs or []


_HINTS = {
    errno.ENOSPC: "free some space and rerun the same command: finished work is kept",
    errno.EDQUOT: "free some space (or raise the quota) and rerun the same command: finished work is kept",
    errno.EROFS: "the file system is read-only; choose a folder you can write to",
    errno.EACCES: "choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "choose a folder you can write to (or fix its permissions)",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; give another path",
    errno.EEXIST: "it is in the way; remove it or choose another path",
}


def os_error_message(exc: OSError) -> str:
    """One line for what the operating system refused: the path, its words, and what to do."""
    # an OSError with no file is not about a file (distributed's CommClosedError is one): say what it is
    where = exc.filename if exc.filename is not None else type(exc).__name__
    what = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno)
    return f"{where}: {what}" + (f"; {hint}" if hint else "")


@contextlib.contextmanager
def naming(path):
    """An OSError raised inside without a path gets PATH: a write that fills the disk reports
    ENOSPC with no file name, and the user must be told where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
