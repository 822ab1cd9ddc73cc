"""What every trial does on its worker, whatever runs it (a sweep's training, a comparison's job):
open the trial's spec (the methods registered in the coordinating process, threads, the pipeline at
its cache's Location, that cache checked), send each epoch's value back, follow a prune decision,
and see the coordinator's stop.

Trials run one at a time in a process (TRIAL_LOCK; see cluster.py for why). Each epoch's value goes
to the coordinator through a dask Queue; with a pruner, the trial then waits for the study's
decision on its own Queue and stops (recorded as pruned) if told to. When the run is interrupted
the coordinator sets a dask Event: the trial saves its state at its next step and ends as
"interrupted".
"""

from __future__ import annotations

import threading
import time

from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.cache import set_codec_threads
from sherl_pipe.cache.location import pipeline_location, with_location
from sherl_pipe.config import Pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import register_method
from sherl_pipe.training.loop import StopTraining

DECISION_TIMEOUT = 600.0  # seconds a trial waits for a prune decision before it carries on
STOP_POLL = 0.5  # seconds between a trial's looks at the coordinator's stop Event
TRIAL_LOCK = threading.Lock()  # one trial at a time in a process: torch's RNG and threads are per process


def open_trial(spec: dict, what: str = "sweep trial", methods: dict | None = None, cache=None) -> Pipeline:
    """SPEC's pipeline in this process (coordinator.trial_spec wrote SPEC): the methods registered
    in the coordinating process (a notebook, a test) registered here too, torch's and the
    decompressor's threads set (trials share the machine's cores), the cache read at its Location
    and checked to be the one the coordinator checked. METHODS and CACHE: where a child process
    got them apart from the spec (compare/job.py: never in a file)."""
    import torch

    for name, cls in (methods if methods is not None else spec.get("methods") or {}).items():
        register_method(name, cls)
    torch.set_num_threads(spec["threads"])
    set_codec_threads(spec["threads"])
    pipeline = Pipeline.from_dict(spec["pipeline"], f"{what} {spec['number']}")
    pipeline = with_location(pipeline, cache if cache is not None else spec.get("cache"))
    check_cache(pipeline, spec["cache_fingerprint"], spec["number"])
    return pipeline


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
