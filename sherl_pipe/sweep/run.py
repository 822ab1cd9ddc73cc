"""`sherl-pipe sweep`: many trials over one cache, searched by an Optuna study that this process
owns, run in parallel on dask workers.

The loop asks the study for a trial, submits it to a worker, passes each epoch's value that comes
back to the study (trial.report) and, with a pruner, sends the study's decision back to the trial;
when a trial ends it tells the study how (complete with its best value, pruned, or failed with its
error). A trial that raises, or whose worker dies, fails alone; the sweep goes on.
"""

from __future__ import annotations

import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sherl_pipe.config import Pipeline
from sherl_pipe.sweep.cluster import Engine
from sherl_pipe.sweep.space import Param, encode
from sherl_pipe.sweep.study import INTERRUPTED, record_error, trial_dir
from sherl_pipe.sweep.trial import run_trial


@dataclass
class Plan:
    """What a sweep run needs, checked before any trial starts."""

    pipeline: Pipeline
    params: list[Param]
    metric: str
    direction: str
    sweep_dir: Path
    budget: int  # trials to finish
    parallel: int
    timeout: float


@dataclass
class Tally:
    done: int = 0
    pruned: int = 0
    failed: int = 0
    best: float | None = None
    events: list[str] = field(default_factory=list)


def finished_count(study, sweep_dir: Path) -> int:
    """Trials that count against the budget: all ended ones except those cut off by a stopped sweep."""
    from optuna.trial import TrialState

    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        error = trial_dir(sweep_dir, t.number) / "error.txt"
        if not (t.state == TrialState.FAIL and error.is_file() and error.read_text().startswith(INTERRUPTED[:12])):
            count += 1
    return count


def best_of(values: list[float], direction: str) -> float | None:
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


class Coordinator:
    def __init__(self, plan: Plan, study, eng: Engine, trial_fn: Callable = run_trial, progress=None,
                 log: Callable[[str], None] = print):
        self.plan, self.study, self.engine, self.trial_fn = plan, study, eng, trial_fn
        self.progress, self.log = progress, log
        self.prefix = f"sherl-sweep-{uuid.uuid4().hex[:8]}"
        self.decide = not _is_nop(study.pruner)
        self.running: dict = {}
        self.tally = Tally()
        self.started = time.monotonic()

    def trial_spec(self, trial) -> dict:
        values = {p.key: p.suggest(trial) for p in self.plan.params}
        trial.set_user_attr("train", {k: encode(v) for k, v in values.items()})
        pipe = self.plan.pipeline.to_dict()
        pipe["train"].update({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
        pipe["train"].update(run_dir=str(trial_dir(self.plan.sweep_dir, trial.number)), threads=self.engine.threads)
        return {"number": trial.number, "pipeline": pipe, "threads": self.engine.threads, "metric": self.plan.metric,
                "reports": f"{self.prefix}-reports", "decisions": f"{self.prefix}-decide", "decide": self.decide}

    def submit(self) -> None:
        trial = self.study.ask()
        spec = self.trial_spec(trial)
        future = self.engine.client.submit(self.trial_fn, spec, key=f"{self.prefix}-trial-{trial.number}",
                                           pure=False, retries=0)
        self.running[future] = trial

    def may_ask(self) -> bool:
        if self.plan.timeout and time.monotonic() - self.started > self.plan.timeout:
            return False
        return finished_count(self.study, self.plan.sweep_dir) + len(self.running) < self.plan.budget

    def pass_reports(self) -> None:
        from distributed import Queue

        by_number = {t.number: t for t in self.running.values()}
        for report in Queue(f"{self.prefix}-reports").get(batch=True):
            trial = by_number.get(report["number"])
            if trial is None or not report["complete"]:
                continue
            trial.report(report["value"], report["epoch"])
            if self.decide:
                decision = "prune" if trial.should_prune() else "continue"
                Queue(f"{self.prefix}-decide-{report['number']}").put(decision)

    def finish(self, future) -> None:
        from optuna.trial import TrialState

        trial = self.running.pop(future)
        try:
            result = future.result()
        except Exception as exc:  # the trial's own error, or its worker's death
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            record_error(self.plan.sweep_dir, trial.number, f"{type(exc).__name__}: {exc}\n\n{text}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.tally.failed += 1
            self.event(f"trial {trial.number} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return
        value = best_of(result["values"], self.plan.direction)
        if result["state"] == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.tally.pruned += 1
            self.event(f"trial {trial.number} pruned after epoch {len(result['values'])}")
        elif value is None:
            record_error(self.plan.sweep_dir, trial.number, "the trial ended without an evaluation")
            self.study.tell(trial, state=TrialState.FAIL)
            self.tally.failed += 1
            self.event(f"trial {trial.number} failed: the trial ended without an evaluation")
        else:
            self.study.tell(trial, value)
            self.tally.done += 1
            self.tally.best = best_of([v for v in (self.tally.best, value) if v is not None], self.plan.direction)
            self.event(f"trial {trial.number}: {self.plan.metric} {value:.4f} ({_shown(trial)})")

    def event(self, line: str) -> None:
        self.log(line)
        if self.progress is not None:
            self.progress(1)
            best = "-" if self.tally.best is None else f"{self.tally.best:.4f}"
            self.progress.set_postfix(done=self.tally.done, running=len(self.running), pruned=self.tally.pruned,
                                      failed=self.tally.failed, best=best)

    def run(self) -> Tally:
        try:
            while True:
                while len(self.running) < self.plan.parallel and self.may_ask():
                    self.submit()
                if not self.running:
                    return self.tally
                time.sleep(0.1)
                done = [f for f in self.running if f.done()]
                self.pass_reports()  # before finishing: a trial's last reports arrive before its result
                for future in done:
                    self.finish(future)
        finally:
            for future in self.running:
                future.cancel()


def _is_nop(pruner) -> bool:
    import optuna

    return isinstance(pruner, optuna.pruners.NopPruner)


def _shown(trial) -> str:
    return ", ".join(f"{k}={v}" for k, v in trial.user_attrs.get("train", {}).items())
