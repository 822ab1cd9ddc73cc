"""Writing files so that a reader (or a resumed run) never sees half of one: write to
PATH.<pid>.partial, then rename over PATH. The pid keeps two writers' temporaries apart."""

from __future__ import annotations

import os
from pathlib import Path


def replace_atomically(path: Path, write) -> None:
    """Call write(tmp_path), then rename the temporary over PATH."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(tmp)
    os.replace(tmp, path)


def write_atomically(path: Path, data) -> None:
    """Write bytes (or any buffer) to PATH."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(data))
