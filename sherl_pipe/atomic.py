"""Writing files so that a reader (or a resumed run) never sees half of one: write to
PATH.<pid>.partial, then rename over PATH. The pid keeps two writers' temporaries apart; the
temporary is removed on every way out (an error, a full disk, Ctrl-C), so none is left behind in
a user's folder."""

from __future__ import annotations

import os
from pathlib import Path

from sherl_pipe.errors import naming


def replace_atomically(path: Path, write) -> None:
    """Call write(tmp_path), then rename the temporary over PATH. An OS error without a path
    (a full disk reports none) names PATH."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with naming(path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data) -> None:
    """Write bytes (or any buffer) to PATH."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(data))
