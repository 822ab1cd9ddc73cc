"""`sherl-pipe compare`: every method x seed as trials of the engine (sherl_pipe/engine/: dask
workers, a journal study per phase, resume after a kill, failed trials recorded), from one cache,
the same batches for a seed whatever the method.

Phases, each a study folder of queued trials under the compare folder (a rerun resumes them):
  calibrate  --budget time only: full fine-tuning at the pipeline's epochs (its seeded runs, kept
             as its results) and CALIBRATION_EPOCHS of every other method; a method then gets as
             many epochs as fit in full fine-tuning's median training time (1 to MAX_EPOCHS): its
             first epoch as measured, the rest at the median of its later epochs (the first one
             carries warm-up)
  tune       --tune-lr only: the method's rates (its new modules' and its pretrained weights',
             together) x 1/3, x 1, x 3 on the first seed; the best validation value wins
  final      every method x seed at its epochs and rates (the budget's; with --budget time, full
             fine-tuning runs again only where its search chose other rates than its calibration's)

At --budget time the budget is enforced, not only predicted: the final runs train with
train.max_seconds = the budget (the trainer's wall-clock stop), and the calibrate and final phases
run one trial at a time, so that no trial's time is another's load.

A method's rates are the pipeline's train.lr and train.lr_late where they are set, else its own
defaults (training/setup.py: learning_rates), resolved once here so that every trial records both.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sherl_pipe.config import Pipeline, absolute_paths
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import REFERENCE
from sherl_pipe.atomic import write_atomically
from sherl_pipe.compare.phase import run_phase
from sherl_pipe.compare.trial import method_reference
from sherl_pipe.compare.variants import method_of, variant_pipeline
from sherl_pipe.methods import get_method
from sherl_pipe.methods import registered_from_code
from sherl_pipe.methods.spec import make_spec
from sherl_pipe.metrics import best_of, is_better
from sherl_pipe.metrics import selection
from sherl_pipe.request import check_test_rows_do_not_choose
from sherl_pipe.engine import start_cluster
from sherl_pipe.training.setup import learning_rates

MAX_EPOCHS = 100
CALIBRATION_EPOCHS = 3  # the first carries warm-up; the others time an epoch
LR_FACTORS = (1 / 3, 1.0, 3.0)
Rates = tuple[float, float]  # (train.lr: new modules and head, train.lr_late: pretrained weights)


@dataclass
class Compare:
    pipeline: Pipeline
    methods: list[str]
    seeds: dict[str, list[int]]  # per method
    budget: str  # epochs | time
    tune_lr: bool
    folder: Path
    metric: str = ""
    direction: str = ""
    epochs: dict[str, int] = field(default_factory=dict)
    rates: dict[str, Rates] = field(default_factory=dict)  # per method, before any search
    tuned_rates: dict[str, Rates] = field(default_factory=dict)  # the rates --tune-lr chose
    budget_seconds: float | None = None  # --budget time: full fine-tuning's median training seconds
    retry_failed: bool = False  # trials that failed run again (their cause fixed)
    fingerprint: str = ""  # the cache's manifest fingerprint, checked by every trial
    keep: str = "best"  # a scored trial's checkpoints: best, or all (checkpoint.keep_best_only)


def plan_compare(pipeline: Pipeline, methods: list[str], seeds: int, live_seeds: int | None, budget: str,
                 tune_lr: bool, folder: str, manifest: dict) -> Compare:
    """The comparison, every method checked against the cache (or the manifest it will have)."""

    if not methods:
        raise SherlError("--methods: name at least one method")
    if not pipeline.train.eval_split:
        raise SherlError(f"{pipeline.origin}: compare keeps each run's best epoch on train.eval_split; set it")
    check_test_rows_do_not_choose(pipeline, "compare", "each run's best epoch, its early stopping and --tune-lr's "
                                                       "rates, which the same rows then score")
    if pipeline.evaluate.split not in manifest["splits"]:
        raise SherlError(f"evaluate.split = '{pipeline.evaluate.split}': the cache has no such split; compare scores "
                         f"each run on it")
    if budget == "time" and REFERENCE not in methods:
        methods = [*methods, REFERENCE]  # the time budget is its time
    check_importable(methods)
    rates = {}
    for name in methods:  # a method, or a method with settings of its own (compare/variants.py)
        train = variant_pipeline(pipeline, name).train
        rates[name] = learning_rates(make_spec(train, manifest), train)  # a bad spec: refused before any trial
    live = {n: live_seeds or seeds for n in methods if get_method(method_of(n)).sources == ("live",)}
    first = pipeline.train.seed
    per = {n: list(range(first, first + live.get(n, seeds))) for n in methods}
    metric, direction = selection(manifest["task"]["type"], pipeline.train.metric)
    return Compare(absolute_paths(pipeline), methods, per, budget, tune_lr, Path(folder).absolute(), metric, direction,
                   rates=rates)


def servable(pipeline: Pipeline, methods: list[str], manifest: dict) -> tuple[list[str], dict[str, str]]:
    """METHODS split into those the cache (or the cache MANIFEST describes) serves and, for the
    others, why not (the method's own refusal: a tier the cache does not hold)."""

    kept, left = [], {}
    for name in methods:
        try:
            make_spec(variant_pipeline(pipeline, name).train, manifest)
            kept.append(name)
        except SherlError as exc:
            left[name] = str(exc)
    return kept, left


def check_importable(methods: list[str]) -> None:
    """A method registered from code as a class reaches each compare job (a process of its own) as
    its import path: refused here, before any trial, when that path does not lead back to it."""

    for name, entry in registered_from_code().items():
        if name not in {method_of(m) for m in methods}:
            continue
        if isinstance(entry, str):
            get_method(name)  # "module:Class": importable here, so in a job too (it gets this process's path)
        else:
            method_reference(entry)


def trial(method: str, seed: int, epochs: int, rates: Rates) -> dict:
    return {"method": method, "seed": seed, "epochs": epochs, "lr": rates[0], "lr_late": rates[1]}


def calibrate_trials(c: Compare) -> list[dict]:
    epochs = c.pipeline.train.epochs
    out = [trial(REFERENCE, s, epochs, c.rates[REFERENCE]) for s in c.seeds[REFERENCE]]
    return out + [trial(m, c.seeds[m][0], CALIBRATION_EPOCHS, c.rates[m]) for m in c.methods if m != REFERENCE]


def time_budget(results: list[dict]) -> float:
    """Full fine-tuning's median training seconds over its calibration runs."""
    ref = [r["train_seconds"] for r in results if r["method"] == REFERENCE and r.get("train_seconds")]
    if not ref:
        raise SherlError("compare --budget time: no full fine-tuning run finished, so there is no time to give the "
                         "other methods; see the failed trials in the calibrate folder")
    return statistics.median(ref)


def epochs_that_fit(budget: float, result: dict) -> int:
    """How many epochs of a calibration run fit in BUDGET seconds: its first epoch as it took, each
    further one at the median of its later epochs. A run from before epochs were timed (one epoch,
    no epoch_seconds) counts its whole time per epoch."""
    ends = result.get("epoch_seconds") or []
    if len(ends) < 2:
        return max(1, min(MAX_EPOCHS, math.floor(budget / result["train_seconds"])))
    later = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    fit = 1 + math.floor(max(budget - ends[0], 0.0) / later) if later > 0 else MAX_EPOCHS
    return max(1, min(MAX_EPOCHS, fit))


def time_budget_epochs(c: Compare, results: list[dict]) -> dict[str, int]:
    """Each method's epochs in full fine-tuning's median time (see epochs_that_fit); sets c.budget_seconds."""
    c.budget_seconds = time_budget(results)
    out = {REFERENCE: c.pipeline.train.epochs}
    for r in results:
        if r["method"] != REFERENCE and r.get("train_seconds"):
            out[r["method"]] = epochs_that_fit(c.budget_seconds, r)
    return out


def tune_trials(c: Compare) -> list[dict]:
    return [trial(m, c.seeds[m][0], c.epochs[m], (c.rates[m][0] * f, c.rates[m][1] * f)) for m in c.methods
            for f in LR_FACTORS if m in c.epochs]


def best_lr(c: Compare, results: list[dict]) -> dict[str, Rates]:
    out: dict[str, tuple[Rates, float]] = {}
    for r in results:
        value = best_of(r.get("values") or [], c.direction)
        if value is not None and (r["method"] not in out or is_better(value, out[r["method"]][1], c.direction)):
            out[r["method"]] = ((r["lr"], r["lr_late"]), value)
    return {m: rates for m, (rates, _) in out.items()}


def final_trials(c: Compare) -> list[dict]:
    def rates(m: str) -> Rates:
        return c.tuned_rates.get(m, c.rates[m])

    # at equal time full fine-tuning's calibration runs are its results, unless a search moved its rates
    skip = {REFERENCE} if c.budget == "time" and rates(REFERENCE) == c.rates[REFERENCE] else set()
    return [trial(m, s, c.epochs[m], rates(m)) for m in c.methods if m in c.epochs and m not in skip
            for s in c.seeds[m]]


def save_plan(c: Compare) -> None:
    description = {"methods": c.methods, "seeds": c.seeds, "budget": c.budget, "tune_lr": c.tune_lr,
                   "metric": c.metric, "direction": c.direction, "epochs": c.epochs, "rates": c.rates,
                   "tuned_rates": c.tuned_rates, "budget_seconds": c.budget_seconds, "keep": c.keep,
                   "pipeline": c.pipeline.to_dict()}
    write_atomically(c.folder / "compare.json", (json.dumps(description, indent=2) + "\n").encode())


def run_compare(c: Compare, scheduler: str | None = None, workers: int = 0, progress=None,
                log: Callable[[str], None] = print, should_stop=None, model_type: str | None = None) -> dict:
    """Run (or resume) every phase; returns {"interrupted": bool, "phases": {name: results}}."""

    c.epochs = {m: c.pipeline.train.epochs for m in c.methods}
    phases: dict[str, list[dict]] = {}
    with start_cluster(scheduler, model_type, workers=workers, warm=("sherl_pipe.compare.trial",)) as eng:
        steps = ([("calibrate", calibrate_trials)] if c.budget == "time" else []) + (
            [("tune", tune_trials)] if c.tune_lr else []) + [("final", final_trials)]
        for name, make in steps:
            timed = c.budget == "time" and name in ("calibrate", "final")  # one trial at a time: no load
            results, interrupted = run_phase(c, name, make(c), eng, progress, log, should_stop,
                                             parallel=1 if timed else None)
            phases[name] = results
            if interrupted:
                return {"interrupted": True, "phases": phases}
            if name == "calibrate":
                c.epochs = time_budget_epochs(c, results)
                log(f"time budget {c.budget_seconds:.1f} s: " + ", ".join(f"{m} {e} epoch(s)"
                                                                         for m, e in c.epochs.items()))
            elif name == "tune":
                c.tuned_rates = best_lr(c, results)
                log("tuned rates (lr, lr_late): " + ", ".join(f"{m} {a:.3g}, {b:.3g}"
                                                              for m, (a, b) in c.tuned_rates.items()))
            save_plan(c)
    return {"interrupted": False, "phases": phases}
