"""Run folders: what a training run writes, and how it is read back.

    RUN/config.json            the resolved pipeline
    RUN/model.json             the model spec, the cache's path and fingerprint, learning rates
    RUN/manifest.json          a copy of the cache's manifest: what `predict` needs without the cache
    RUN/metrics.jsonl          one JSON object per line: train-loss records and per-epoch evaluations
    RUN/checkpoints/best.safetensors, last.safetensors   stage-two weights
    RUN/checkpoints/state.pt   the full training state of `last` (for --resume)
    RUN/summary.json           written when training ends
A sweep or compare trial, once scored, keeps only best.safetensors of its checkpoints (keep =
"best": keep_best_only); `last` and state.pt are then gone, and the finished run cannot be resumed
(a trial that is cut off is never resumed either: it runs again from its start as a new trial).
Every file is written to a `.partial` name and renamed, so a killed run never leaves half a file.
A folder is recognised as a run folder by its model.json (with a model spec) or its state.pt; only
such a folder is ever deleted by --overwrite.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from sherl_pipe.atomic import write_atomically
from sherl_pipe.errors import SherlError, naming
from sherl_pipe.folders import clear_folder, ensure_writable, has_files, refuse_cwd
from sherl_pipe.locks import FolderLock

REQUIRED = ("config.json", "model.json")


def atomic_write_json(path: Path, obj) -> None:
    write_atomically(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, save(state))


def load_weights(path: Path, model: torch.nn.Module, checkpoint: str) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        if kept_best_only(path.parent.parent):
            raise SherlError(f"run checkpoint {path}: dropped when the trial was scored (keep = \"best\"); use "
                             f"--checkpoint best, or run the sweep or comparison with keep = \"all\"")
        other = "last" if checkpoint == "best" else "best"
        raise SherlError(f"run checkpoint {path}: not found; the run has not saved a '{checkpoint}' checkpoint "
                         f"(finish or resume the run, or use --checkpoint {other})")
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise SherlError(f"run checkpoint {path}: cannot read ({exc})") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SherlError(f"run checkpoint {path}: does not fit the model in model.json (missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); the folder "
                         f"is damaged or its files are from different runs")


def is_run_folder(path: Path) -> bool:
    """A folder sherl-pipe wrote: a model.json holding a model spec, or a saved training state."""
    if (path / "checkpoints" / "state.pt").is_file():
        return True
    try:
        return "spec" in json.loads((path / "model.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


KEEP = ("best", "all")  # sweep.keep, compare --keep
RESUME_ONLY = ("last.safetensors", "state.pt")  # in checkpoints/: what only --resume and --checkpoint last read


def check_keep(keep: str, where: str) -> None:
    if keep not in KEEP:
        raise SherlError(f"{where} = {keep!r}: give one of {', '.join(KEEP)}")


def kept_best_only(path: Path) -> bool:
    """A finished run whose resume state keep_best_only dropped."""
    return (path / "summary.json").is_file() and not (path / "checkpoints" / "state.pt").is_file() \
        and (path / "checkpoints" / "best.safetensors").is_file()


def keep_best_only(path: Path, log=None) -> int:
    """A scored trial's run folder PATH without its resume state and last-epoch weights (a sweep or
    compare trial reads only its best weights once scored: at base size they are most of a
    comparison's gigabytes); the bytes freed. Nothing is dropped unless the best weights are there.
    A file the system refuses to delete stays, said through LOG: the trial was scored, and a
    failure to tidy must not record it as failed."""
    folder = Path(path) / "checkpoints"
    if not (folder / "best.safetensors").is_file():
        return 0
    freed = 0
    for name in RESUME_ONLY:
        f = folder / name
        try:
            size = f.stat().st_size
            f.unlink()
            freed += size
        except FileNotFoundError:
            pass
        except OSError as exc:
            if log is not None:
                log(f"warning: {f}: not dropped ({exc.strerror or exc}); the trial's result stands")
    return freed


class RunFolder:
    """A run folder held (locked) by this process while it trains."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = FolderLock(self.path)

    def prepare(self, resume: bool, overwrite: bool, log=print) -> bool:
        """Create (or check) the folder and lock it; True when an earlier run is to be continued.
        A run folder without a checkpoint (its first epoch failed, was killed or ran out of disk)
        holds nothing to keep or continue: a plain retry, or --resume, starts it again."""
        if resume and overwrite:
            raise SherlError("--resume and --overwrite contradict each other; give one")
        p = self.path
        if p.exists() and not p.is_dir():
            raise SherlError(f"run folder {p}: is a file, not a folder; set train.run_dir to a folder")
        existing = p.is_dir() and has_files(p)
        if existing and not is_run_folder(p):
            raise SherlError(f"run folder {p}: exists and is not a sherl-pipe run folder (no model.json or "
                             f"checkpoints/state.pt); it is never deleted: set train.run_dir to another folder")
        if not existing and resume:
            raise SherlError(f"run folder {p}: nothing to resume (no earlier run there)")
        if existing and not overwrite and kept_best_only(p):
            raise SherlError(f"run folder {p}: a finished run that kept only its best weights (keep = \"best\"); "
                             f"there is nothing to resume: use --overwrite to train it again, or set train.run_dir "
                             f"to another folder")
        if existing and not (resume or overwrite) and self.state_path.is_file():
            raise SherlError(f"run folder {p} already exists; use --resume to continue it, --overwrite "
                             f"to replace it, or set train.run_dir to another folder")
        if existing and overwrite:
            refuse_cwd(p, "run folder")
        ensure_writable(p, "run folder")
        if not self.lock.acquire(wait=False):
            raise SherlError(f"run folder {p}: another sherl-pipe process is training in it; wait for it to "
                             f"finish or set train.run_dir to another folder")
        if existing and not self.state_path.is_file():
            refuse_cwd(p, "run folder")  # it is about to be emptied
            if not kept_best_only(p):  # (that one is replaced by --overwrite, as asked)
                log(f"run folder {p}: holds no checkpoint (its first epoch did not finish); starting it again")
            return False
        return bool(existing and resume)

    def start_fresh(self) -> None:
        """Empty the (locked) folder for a new run: called once the new run is built, so a run that
        fails to start never costs the one it was to replace."""
        clear_folder(self.path)
        (self.path / "checkpoints").mkdir()

    def release(self) -> None:
        self.lock.release()

    @property
    def state_path(self) -> Path:
        return self.path / "checkpoints" / "state.pt"

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def save_weights(self, name: str, model: torch.nn.Module) -> None:
        save_weights(self.path / "checkpoints" / f"{name}.safetensors", model)

    def save_state(self, state: dict) -> None:
        # serialized in memory first: torch.save reports a full disk as a RuntimeError with no
        # path ("file write failed"); a plain write raises the OSError that names the file
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(self.state_path, buffer.getbuffer())

    def load_state(self) -> dict:
        try:
            return torch.load(self.state_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises several types for a damaged file
            raise SherlError(f"run folder {self.path}: checkpoints/state.pt cannot be read ({exc}); "
                             f"use --overwrite to start again") from None

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.path / "metrics.jsonl", record)

    def truncate_metrics(self, step: int) -> None:
        truncate_metrics(self.path / "metrics.jsonl", step)


def read_run(run_dir: str | os.PathLike) -> tuple[Path, dict, dict]:
    """(folder, resolved config, model.json) of a run, with a clear error for anything missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise SherlError(f"run folder {run}: not found; give the train.run_dir of a finished `sherl-pipe train`")
    missing = [name for name in REQUIRED if not (run / name).is_file()]
    if missing:
        raise SherlError(f"run folder {run}: missing {', '.join(missing)}; not a sherl-pipe run folder, or damaged")
    try:
        config = json.loads((run / "config.json").read_text())
        model = json.loads((run / "model.json").read_text())
    except ValueError as exc:
        raise SherlError(f"run folder {run}: config.json or model.json is not valid JSON ({exc})") from None
    return run, config, model


def append_jsonl(path: Path, record: dict) -> None:
    with naming(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint being resumed (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_atomically(path, ("\n".join(kept) + "\n" if kept else "").encode())
