"""Run folders: what a training run writes, and how it is read back.

    RUN/config.json            the resolved pipeline
    RUN/model.json             the model spec, the cache's path and fingerprint
    RUN/metrics.jsonl          one JSON object per line: train-loss records and per-epoch evaluations
    RUN/checkpoints/best.safetensors, last.safetensors   stage-two weights
    RUN/checkpoints/state.pt   the full training state of `last` (for --resume)
    RUN/summary.json           written when training ends
Every file is written to a `.partial` name and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sherl_pipe.atomic import replace_atomically, write_atomically
from sherl_pipe.errors import SherlError

REQUIRED = ("config.json", "model.json")


def atomic_write_json(path: Path, obj) -> None:
    write_atomically(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, save(state))


def load_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SherlError(f"run checkpoint {path}: not found; the run has not saved it (train longer, or "
                         f"use --checkpoint last)")
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise SherlError(f"run checkpoint {path}: cannot read ({exc})") from None
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SherlError(f"run checkpoint {path}: does not fit the model in model.json (missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); the folder "
                         f"is damaged or its files are from different runs")


def save_state(path: Path, state: dict) -> None:
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Create the folder; True when an earlier run's state is to be continued."""
    if resume and overwrite:
        raise SherlError("--resume and --overwrite contradict each other; give one")
    state = run_dir / "checkpoints" / "state.pt"
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            if not state.is_file():
                raise SherlError(f"run folder {run_dir}: nothing to resume (no checkpoints/state.pt); "
                                 f"use --overwrite to start again")
            return True
        else:
            raise SherlError(f"run folder {run_dir} already exists; use --resume to continue it, --overwrite "
                             f"to replace it, or set train.run_dir to another folder")
    elif resume:
        raise SherlError(f"run folder {run_dir}: nothing to resume (it does not exist)")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return False


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
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint being resumed (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_atomically(path, ("\n".join(kept) + "\n" if kept else "").encode())
