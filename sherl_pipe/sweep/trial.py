"""A sweep's trial, run in-process on a dask worker: `sherl-pipe train` with the trial's settings.

The trial opens its spec (engine/worker.py: threads, the cache at its Location and checked against
the sweep's), trains in its own run folder (an absolute path under the sweep folder, as are the
cache and the data: the worker's directory is not the sweep's), reports each epoch to the sweep,
and changes nothing process-wide that outlives it (training forks the RNG).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch

from sherl_pipe.atomic import write_atomically
from sherl_pipe.engine import TRIAL_LOCK, Reporter, StopFlag, open_trial
from sherl_pipe.training import train
from sherl_pipe.training.checkpoint import keep_best_only


def rss_mb() -> float | None:
    """This process's resident memory now (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """The highest resident memory of this process while a trial runs, sampled every 0.1 s."""

    def __init__(self):
        self.peak, self._stop = rss_mb() or 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mb() or 0.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb() or 0.0)


def run_trial(spec: dict) -> dict:
    """What the sweep submits to a worker. SPEC: number, pipeline (a dict, absolute paths), threads,
    metric, reports/decisions (queue names), decide (whether to wait for prune decisions), stop
    (the Event name), cache_fingerprint, keep (best: a scored trial drops its resume state)."""
    with TRIAL_LOCK:
        return _run_trial(spec)


def _run_trial(spec: dict) -> dict:
    pipeline = open_trial(spec)
    reporter = Reporter(spec)
    t0 = time.perf_counter()
    with PeakMemory() as memory:
        # the sweep checked the cache against the pipeline's data, backbone and extract sections once
        # for all its trials, which vary only train settings
        # no tier-weight pass after each trial: it reads the training split once more
        result = train(pipeline, overwrite=True, log=lambda m: None, on_epoch=reporter, check_cache=False,
                       tier_weights=False, should_stop=StopFlag(spec["stop"]))
    state = {"pruned": "pruned", "interrupted": "interrupted"}.get(result.stop_reason, "complete")
    out = {
        "number": spec["number"], "state": state,
        "stop_reason": result.stop_reason, "epochs": result.epochs_done, "steps": result.steps,
        "values": reporter.values, "final": reporter.values[-1] if reporter.values else None,
        "best": result.best, "last_eval": result.last_eval, "train_seconds": result.seconds,
        "seconds": time.perf_counter() - t0, "samples_per_s": result.samples_per_s,
        "peak_rss_mb": memory.peak, "threads": torch.get_num_threads(), "run_dir": str(result.run_dir)}
    if state != "interrupted" and spec.get("keep", "best") == "best":  # scored: nothing will resume it
        out["freed_bytes"] = keep_best_only(Path(result.run_dir), log=lambda m: None)  # its result stands
    write_atomically(Path(result.run_dir) / "trial.json", (json.dumps(out, indent=2) + "\n").encode())
    return out
