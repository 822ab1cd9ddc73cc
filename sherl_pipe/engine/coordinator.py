"""The coordinator: runs a study's trials on a cluster, one per worker process, and keeps the
study's record true (a sweep's search and a comparison's queued trials alike).

The loop asks the study for a trial, submits TRIAL_FN(spec) to a worker running no other trial,
passes each epoch's value that comes back to the study (trial.report) and, with a pruner, sends the
study's decision back to the trial; when a trial ends it tells the study how: complete with its
best value, pruned, failed with its error, or run again (interrupted by Ctrl-C, or lost with its
worker). A trial that raises, or whose worker dies, fails alone; the run goes on.

Ctrl-C (should_stop): no new trials; the stop Event tells the running ones to save their state at
their next step; each is recorded as interrupted (run again on resume) as it ends, and the loop
returns `interrupted`. A second Ctrl-C (KeyboardInterrupt) records the running trials as
interrupted at once and leaves.
"""

from __future__ import annotations

import math
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.config import Pipeline, laid_over
from sherl_pipe.engine.cluster import Cluster
from sherl_pipe.engine.study import INTERRUPTED, LOST, LOST_AGAIN, finished_count, record_error, run_again, trial_dir
from sherl_pipe.errors import SherlError
from sherl_pipe.fields import as_written
from sherl_pipe.interrupts import held_interrupts
from sherl_pipe.methods import registered_from_code
from sherl_pipe.metrics import best_of
from sherl_pipe.engine.param import Param, encode


ORPHAN_GRACE = 10.0  # seconds a trial may wait for a worker that left the cluster
WORKER_WAIT = 120.0  # seconds the loop waits for a worker when trials remain and none is left


@dataclass
class Plan:
    """What a run of trials needs, checked before any trial starts."""

    pipeline: Pipeline  # its paths absolute (config.absolute_paths): trials run in the workers' directories
    params: list[Param]
    metric: str
    direction: str
    sweep_dir: Path  # absolute
    budget: int  # trials to finish
    parallel: int
    timeout: float
    cache_fingerprint: str = ""
    keep: str = "best"  # a scored trial's checkpoints: best (its best weights only) or all


@dataclass
class Tally:
    done: int = 0
    pruned: int = 0
    failed: int = 0
    again: int = 0  # interrupted or lost: run again
    best: float | None = None
    interrupted: bool = False
    events: list[str] = field(default_factory=list)


def is_lost_worker(exc: BaseException) -> bool:
    """Whether a trial's future failed because its worker died, not because the trial raised."""
    from distributed.scheduler import KilledWorker

    return isinstance(exc, KilledWorker)


class Coordinator:
    """PLAN's trials of STUDY on CLUSTER: TRIAL_FN(spec) runs each on a worker (the spec: trial_spec;
    a worker opens it with worker.open_trial) and returns its result, a dict with "state" (complete,
    pruned, interrupted) and "values" (the metric at each epoch)."""

    def __init__(self, plan: Plan, study, eng: Cluster, trial_fn: Callable[[dict], dict], progress=None,
                 log: Callable[[str], None] = print, should_stop: Callable[[], bool] | None = None):
        self.plan, self.study, self.engine, self.trial_fn = plan, study, eng, trial_fn
        self.progress, self.log, self.should_stop = progress, log, should_stop or (lambda: False)
        self.prefix = f"sherl-sweep-{uuid.uuid4().hex[:8]}"
        self.decide = not _is_nop(study.pruner)
        self.running: dict = {}  # future -> (trial, worker address)
        self.tally = Tally()
        self.started = time.monotonic()

    def trial_spec(self, trial) -> dict:
        values = {p.key: p.suggest(trial) for p in self.plan.params}
        trial.set_user_attr("train", {k: encode(v) for k, v in values.items()})
        pipe = self.plan.pipeline.to_dict(given=True)  # the methods' settings as given: read again by the trial
        pipe["train"] = laid_over(pipe["train"], {k: as_written(v) for k, v in values.items()})
        # each trial keeps its best epoch (and stops early) by the metric the sweep ranks it on
        pipe["train"].update(run_dir=str(trial_dir(self.plan.sweep_dir, trial.number)), threads=self.engine.threads,
                             metric=self.plan.metric)
        return {"number": trial.number, "pipeline": pipe, "threads": self.engine.threads, "metric": self.plan.metric,
                "reports": f"{self.prefix}-reports", "decisions": f"{self.prefix}-decide", "decide": self.decide,
                "stop": f"{self.prefix}-stop", "cache_fingerprint": self.plan.cache_fingerprint, "keep": self.plan.keep,
                # the cache as one Location: its storage options (credentials among them) go to the
                # worker in memory (dask), never to a file or a log (a Location's repr leaves them out)
                "cache": pipeline_location(self.plan.pipeline, training=True),
                # registered in this process (a notebook, a test): a worker knows only the package's own
                "methods": registered_from_code()}

    def submit(self, worker: str) -> None:
        trial = self.study.ask()
        spec = self.trial_spec(trial)
        future = self.engine.client.submit(self.trial_fn, spec, key=f"{self.prefix}-trial-{trial.number}",
                                           pure=False, retries=0, workers=[worker], allow_other_workers=False)
        self.running[future] = (trial, worker)

    def may_ask(self) -> bool:
        if self.tally.interrupted:
            return False
        if self.plan.timeout and time.monotonic() - self.started > self.plan.timeout:
            return False
        return finished_count(self.study, self.plan.sweep_dir) + len(self.running) < self.plan.budget

    def fill(self) -> None:
        """Submit trials while the budget allows, each to a worker running none of them."""
        while len(self.running) < self.plan.parallel and self.may_ask():
            free = self.engine.free_workers({w for _, w in self.running.values()})
            if not free:
                return
            self.submit(free[0])

    def pass_reports(self) -> None:
        from distributed import Queue

        by_number = {t.number: t for t, _ in self.running.values()}
        for report in Queue(f"{self.prefix}-reports").get(batch=True):
            trial = by_number.get(report["number"])
            if trial is None or not report["complete"] or not math.isfinite(report["value"]):
                continue
            trial.report(report["value"], report["epoch"])
            if report.get("asks"):
                decision = "prune" if trial.should_prune() else "continue"
                Queue(f"{self.prefix}-decide-{report['number']}").put(decision)

    def finish(self, future) -> None:
        trial, _ = self.running.pop(future)
        try:
            result = future.result()
        except Exception as exc:  # the trial's own error, or its worker's death
            if is_lost_worker(exc):
                return self.lost(trial)
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return self.failed(trial, f"{type(exc).__name__}: {exc}", text)
        if result["state"] == "interrupted":
            return self.again(trial, INTERRUPTED, f"trial {trial.number} interrupted: it runs again on resume")
        self.ended(trial, result)

    def ended(self, trial, result: dict) -> None:
        from optuna.trial import TrialState

        value = best_of(result["values"], self.plan.direction)
        if result["state"] == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.tally.pruned += 1
            self.event(f"trial {trial.number} pruned after epoch {len(result['values'])}")
        elif value is None:
            why = ("the trial ended without an evaluation" if not result["values"] else
                   f"{self.plan.metric} was not finite at any epoch ({result['values']}): the training diverged?")
            self.failed(trial, why)
        else:
            self.study.tell(trial, value)
            self.tally.done += 1
            self.tally.best = best_of([v for v in (self.tally.best, value) if v is not None], self.plan.direction)
            self.event(f"trial {trial.number}: {self.plan.metric} {value:.4f} ({_shown(trial)})")

    def failed(self, trial, why: str, text: str = "") -> None:
        from optuna.trial import TrialState

        record_error(self.plan.sweep_dir, trial.number, f"{why}\n\n{text}" if text else why)
        self.study.tell(trial, state=TrialState.FAIL)
        self.tally.failed += 1
        self.event(f"trial {trial.number} failed: {why.splitlines()[0][:200]}")

    def lost(self, trial) -> None:
        if int(trial.user_attrs.get("lost", 0)) >= 1:  # its worker died twice: do not loop on it
            return self.failed(trial, LOST_AGAIN)
        self.again(trial, LOST, f"trial {trial.number} lost: its worker died; it runs again")

    def again(self, trial, reason: str, line: str) -> None:
        run_again(self.study, self.plan.sweep_dir, trial, reason)
        self.tally.again += 1
        self.log(line)

    def event(self, line: str) -> None:
        self.log(line)
        if self.progress is not None:
            self.progress(1)
            best = "-" if self.tally.best is None else f"{self.tally.best:.4f}"
            self.progress.set_postfix(done=self.tally.done, running=len(self.running), pruned=self.tally.pruned,
                                      failed=self.tally.failed, best=best)

    def stop(self) -> None:
        """The first Ctrl-C: no new trials; the running ones stop at their next step."""
        from distributed import Event

        self.tally.interrupted = True
        Event(f"{self.prefix}-stop").set()

    def orphans(self) -> None:
        """A trial whose worker vanished before it started never gets an answer (it may run on that
        worker only): after ORPHAN_GRACE seconds without its worker it is lost like the others."""
        now = time.monotonic()
        if now - self.checked < 2.0:
            return
        self.checked = now
        alive = set(self.engine.client.scheduler_info(n_workers=-1)["workers"])
        for future, (trial, worker) in list(self.running.items()):
            if worker in alive or future.done():
                self.missing.pop(future, None)
            elif now - self.missing.setdefault(future, now) > ORPHAN_GRACE:
                future.cancel()
                self.running.pop(future)
                self.missing.pop(future)
                self.lost(trial)

    def no_worker_left(self) -> bool:
        """True when trials remain but the cluster has had no worker for WORKER_WAIT seconds (a local
        cluster replaces a dead worker within seconds; a remote one may never): the loop then ends
        with an error instead of reporting a finished run with its work undone."""
        if not self.may_ask():
            self.idle_since = None
            return False
        now = time.monotonic()
        self.idle_since = self.idle_since or now
        return now - self.idle_since > WORKER_WAIT

    def undone(self) -> SherlError:
        left = self.plan.budget - finished_count(self.study, self.plan.sweep_dir)
        return SherlError(f"{self.plan.sweep_dir}: {left} trial(s) did not run: the cluster has had no worker for "
                          f"{WORKER_WAIT:.0f} s (its workers died and none replaced them); what finished is kept: "
                          f"start workers (or use the local cluster) and rerun the same command to resume")

    def run(self) -> Tally:
        """The loop. A second Ctrl-C lands only between its bookkeeping steps (held_interrupts):
        every trial is then either recorded or still in the running set, which it records."""
        self.checked, self.missing, self.idle_since = 0.0, {}, None
        try:
            while True:
                with held_interrupts():
                    if self.should_stop() and not self.tally.interrupted:
                        self.stop()
                    self.fill()
                if not self.running:
                    if not self.may_ask():  # the budget is spent, or a stop or time-out ended it
                        return self.tally
                    if self.no_worker_left():
                        raise self.undone()
                    time.sleep(0.5)  # no free worker right now: wait for one (a dead one is replaced)
                    continue
                self.idle_since = None
                time.sleep(0.1)
                done = [f for f in self.running if f.done()]
                self.pass_reports()  # before finishing: a trial's last reports arrive before its result
                for future in done:
                    with held_interrupts():
                        self.finish(future)
                with held_interrupts():
                    self.orphans()
        except KeyboardInterrupt:  # a second Ctrl-C: the running trials are run again on resume
            with held_interrupts():
                for future, (trial, _) in list(self.running.items()):
                    future.cancel()
                    run_again(self.study, self.plan.sweep_dir, trial, INTERRUPTED)
                self.running.clear()
            raise
        finally:
            for future in self.running:
                future.cancel()


def _is_nop(pruner) -> bool:
    import optuna

    return isinstance(pruner, optuna.pruners.NopPruner)


def _shown(trial) -> str:
    return ", ".join(f"{k}={v}" for k, v in trial.user_attrs.get("train", {}).items())
