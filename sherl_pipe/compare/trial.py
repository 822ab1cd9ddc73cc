"""A compare trial on a dask worker: job.py in a child process (so that its peak memory is its own),
stopped with SIGINT when the sweep's stop Event is set, its result read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sherl_pipe.cache.location import location_to_json
from sherl_pipe.compare.job import PARENT_ENV
from sherl_pipe.compare.variants import variant_train
from sherl_pipe.engine import StopFlag
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import REFERENCE
from sherl_pipe.methods import resolve


def job_folder(run_dir: str) -> Path:
    """Where a trial's spec and result live: beside its run folder (which training empties)."""
    run = Path(run_dir)
    return run.parent.parent / "jobs" / run.name


def job_command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "sherl_pipe.compare.job", str(spec_path)]


def run_compare_trial(spec: dict) -> dict:
    """What compare submits to a worker; SPEC as for every trial (engine/coordinator.py: trial_spec).

    The job runs in a session of its own, so a terminal's Ctrl-C reaches it only as the SIGINT this
    function sends when the sweep's stop is set (a Ctrl-C that reached it while it started killed
    it, and the trial was recorded as failed, never rerun); it ends with this worker (job.py sets a
    parent-death signal); its stderr goes to a file in the job folder (a pipe that nobody read
    while it ran blocked the job once it held 64 KiB)."""

    spec = {**spec, "pipeline": {**spec["pipeline"], "train": variant_train(spec["pipeline"]["train"])}}
    if spec["pipeline"]["train"]["method"] == REFERENCE:  # its time is the budget: never cut by it
        spec = {**spec, "pipeline": {**spec["pipeline"], "train": {**spec["pipeline"]["train"], "max_seconds": 0.0}}}
    folder = job_folder(spec["pipeline"]["train"]["run_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    # the cache's Location (its options may hold credentials) reaches the job through its stdin, never a file
    (folder / "spec.json").write_text(json.dumps({k: v for k, v in spec.items() if k not in HIDDEN}))
    env = {**os.environ, **{k: str(spec["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
           PARENT_ENV: str(os.getpid()), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with open(folder / "stderr.txt", "w") as err_file:
        proc = subprocess.Popen(job_command(folder / "spec.json"), env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True, start_new_session=True)
        method = spec["pipeline"]["train"]["method"]
        mine = {k: v for k, v in (spec.get("methods") or {}).items() if k == method}  # registered from code
        cache = spec.get("cache")
        proc.stdin.write(json.dumps({"cache": location_to_json(cache) if cache is not None else None, "methods": mine},
                                    default=method_reference))  # a class: its import path
        proc.stdin.close()
        asked = _wait(proc, StopFlag(spec["stop"]))
    err = (folder / "stderr.txt").read_text(errors="replace")
    if asked and not (folder / "result.json").is_file():  # stopped before training could save its state
        return {"number": spec["number"], "state": "interrupted"}
    if proc.returncode == 2 and err.strip().startswith("error: "):
        raise SherlError(err.strip().splitlines()[-1][len("error: "):])
    if proc.returncode != 0:
        raise RuntimeError(f"compare trial {spec['number']} exited with status {proc.returncode}: {err[-2000:]}")
    return json.loads((folder / "result.json").read_text())


def _wait(proc, stop) -> bool:
    """Until the job ends; a set stop is passed on once as SIGINT (the job saves its state at its
    next step). Whether it was asked to stop."""
    asked = False
    while proc.poll() is None:
        time.sleep(0.2)
        if not asked and stop():
            proc.send_signal(2)
            asked = True
    return asked


def method_reference(cls) -> str:
    """CLS's import path, or one line saying why a compare job (a fresh process) could not import it."""

    module, name = getattr(cls, "__module__", None), getattr(cls, "__qualname__", "")
    try:
        found = resolve(f"{module}:{name}")
    except (ImportError, AttributeError, TypeError, ValueError):
        found = None
    if found is not cls or module == "__main__" or "<locals>" in name:
        raise SherlError(f"method {name or cls!r} registered from code is defined in {module or 'no module'}, which "
                         f"a compare job (a process of its own) cannot import: define it at the top level of a "
                         f"module on the Python path and register it from there")
    return f"{module}:{name}"


HIDDEN = ("cache", "methods")  # sent to the job on its stdin, never written to spec.json
