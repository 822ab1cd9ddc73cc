"""One trial, run in-process on a dask worker: `sherl-pipe train` with the trial's settings.

The trial sets its own torch thread count, trains in its own run folder (an absolute path under the
sweep folder, as are the cache and the data: the worker's directory is not the sweep's), opens the
cache read-only after checking it is the one the sweep checked (its manifest fingerprint), and
changes nothing process-wide that outlives it (training forks the RNG). Trials run one at a time
in a process (TRIAL_LOCK; see engine.py for why). Each epoch's value goes to the sweep through a
dask Queue; with a pruner, the trial then waits for the sweep's decision on its own Queue and
stops (recorded as pruned) if told to. When the sweep is interrupted it sets a dask Event: the
trial saves its state at its next step and ends as "interrupted".
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from sherl_pipe.atomic import write_atomically
from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.cache import set_codec_threads
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.cache.location import with_storage_options
from sherl_pipe.config import Pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import register_method
from sherl_pipe.training import train
from sherl_pipe.training.loop import StopTraining

DECISION_TIMEOUT = 600.0  # seconds a trial waits for a prune decision before it carries on
STOP_POLL = 0.5  # seconds between a trial's looks at the sweep's stop Event
TRIAL_LOCK = threading.Lock()  # one trial at a time in a process: torch's RNG and threads are per process


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


def epoch_value(record: dict, metric: str) -> float:
    return record["train_loss"] if metric == "train_loss" else record["eval"][metric]


class Reporter:
    """The trainer's epoch callback inside a trial: send the epoch's value, follow a prune decision.
    No decision is asked for after the final epoch (a trial that has finished is complete, not
    pruned) or for a value that is not finite (the sweep does not report it to the study)."""

    def __init__(self, spec: dict):
        self.number, self.metric, self.spec = spec["number"], spec["metric"], spec
        self.values: list[float] = []

    def __call__(self, record: dict) -> None:
        import math

        from distributed import Queue


        value = epoch_value(record, self.metric)
        self.values.append(value)
        asks = self.spec["decide"] and record["complete"] and not record.get("final") and math.isfinite(value)
        report = {"number": self.number, "epoch": record["epoch"], "value": value, "complete": record["complete"],
                  "asks": asks}
        Queue(self.spec["reports"]).put(report)
        if not asks:
            return
        try:
            decision = Queue(f"{self.spec['decisions']}-{self.number}").get(timeout=DECISION_TIMEOUT)
        except TimeoutError:  # the sweep did not answer: carry on rather than fail a healthy trial
            return
        if decision == "prune":
            raise StopTraining("pruned")


class StopFlag:
    """`should_stop` for the trial's training: whether the sweep set its stop Event (looked up at
    most every STOP_POLL seconds, not at every step: each look is a message to the scheduler)."""

    def __init__(self, name: str):
        self.name, self.last, self.stopped = name, 0.0, False

    def __call__(self) -> bool:
        if not self.stopped and time.monotonic() - self.last >= STOP_POLL:
            from distributed import Event

            self.last = time.monotonic()
            self.stopped = Event(self.name).is_set()
        return self.stopped


def check_cache(pipeline, fingerprint: str, number: int) -> None:
    """The trial's cache is the one the sweep checked (a worker may see another folder at that path)."""
    import socket


    path = pipeline.extract.cache
    if manifest_fingerprint(Cache(pipeline_location(pipeline, training=True)).manifest) != fingerprint:
        raise SherlError(f"sweep trial {number}: the cache at {path} on {socket.gethostname()} is not the one the "
                         f"sweep checked (its manifest fingerprint differs); the workers must reach the sweep's "
                         f"cache at the same path")


def run_trial(spec: dict) -> dict:
    """What the sweep submits to a worker. SPEC: number, pipeline (a dict, absolute paths), threads,
    metric, reports/decisions (queue names), decide (whether to wait for prune decisions), stop
    (the Event name), cache_fingerprint."""
    with TRIAL_LOCK:
        return _run_trial(spec)


def _run_trial(spec: dict) -> dict:
    import torch



    for name, cls in spec.get("methods", {}).items():  # registered in the sweep's process (a notebook, a test)
        register_method(name, cls)
    torch.set_num_threads(spec["threads"])
    set_codec_threads(spec["threads"])  # the decompressor's threads too: trials share the machine's cores
    pipeline = with_storage_options(Pipeline.from_dict(spec["pipeline"], f"sweep trial {spec['number']}"),
                                    spec.get("storage_options"))
    check_cache(pipeline, spec["cache_fingerprint"], spec["number"])
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
    write_atomically(Path(result.run_dir) / "trial.json", (json.dumps(out, indent=2) + "\n").encode())
    return out
