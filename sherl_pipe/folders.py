"""Output folders sherl-pipe owns (caches, run folders): whether they hold anything, and emptying
one without ever removing the current directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sherl_pipe.errors import SherlError
from sherl_pipe.errors import os_error_message


def has_files(path: Path) -> bool:
    return any(p.is_file() or p.is_symlink() for p in Path(path).rglob("*"))


def clear_folder(path: Path) -> None:
    """Delete what a folder holds, keeping the folder itself (and so a lock held on it)."""
    for entry in Path(path).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def refuse_cwd(path: Path, what: str) -> None:
    here = Path.cwd().resolve()
    if Path(path).resolve() == here or Path(path).resolve() in here.parents:
        raise SherlError(f"{what} {path}: is the current directory or holds it; refusing to delete it with "
                         f"--overwrite; give another folder")


def ensure_writable(folder: Path, what: str) -> None:
    """Create FOLDER (and its parents) and write a probe file in it, before any work is done there:
    a read-only or full file system is one line naming the folder now, not a traceback later."""
    folder = Path(folder)
    probe = folder / f".sherl-write-test.{os.getpid()}.partial"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:

        raise SherlError(f"{what} {folder}: cannot write there ({os_error_message(exc)})") from None
