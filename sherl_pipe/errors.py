"""One exception type for every error a user can fix.

The library raises `SherlError` with a message that names the file, field or option at fault and
how to fix it; `cli.py` prints that one line and exits non-zero. Anything else is a bug and keeps
its traceback.
"""


class SherlError(Exception):
    """A problem with the user's input, files or request (never a bug in sherl-pipe)."""


class CacheMismatch(SherlError):
    """An existing cache was made for a different request (other model, data or settings)."""
