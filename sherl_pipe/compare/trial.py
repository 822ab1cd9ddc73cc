"""A compare trial on a dask worker: job.py in a child process (so that its peak memory is its own),
stopped with SIGINT when the sweep's stop Event is set, its result read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sherl_pipe.errors import SherlError
from sherl_pipe.sweep.trial import StopFlag


def job_folder(run_dir: str) -> Path:
    """Where a trial's spec and result live: beside its run folder (which training empties)."""
    run = Path(run_dir)
    return run.parent.parent / "jobs" / run.name


def run_compare_trial(spec: dict) -> dict:
    """What compare submits to a worker; SPEC as for a sweep trial (sweep/run.py: trial_spec)."""
    folder = job_folder(spec["pipeline"]["train"]["run_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    # the storage options (credentials among them) reach the job through its stdin, never a file
    hidden = spec.get("storage_options")
    (folder / "spec.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "storage_options"}))
    env = {**os.environ, **{k: str(spec["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    proc = subprocess.Popen([sys.executable, "-m", "sherl_pipe.compare.job", str(folder / "spec.json")], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(hidden.value if hidden is not None else None))
    proc.stdin.close()
    stop, asked = StopFlag(spec["stop"]), False
    while proc.poll() is None:
        time.sleep(0.2)
        if not asked and stop():
            proc.send_signal(2)  # SIGINT: the job saves its state at its next step
            asked = True
    err = proc.stderr.read()
    if proc.returncode == 2 and err.strip().startswith("error: "):
        raise SherlError(err.strip().splitlines()[-1][len("error: "):])
    if proc.returncode != 0:
        raise RuntimeError(f"compare trial {spec['number']} exited with status {proc.returncode}: {err[-2000:]}")
    return json.loads((folder / "result.json").read_text())
