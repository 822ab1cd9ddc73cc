"""The commands' flows as library calls: `run` (extract if needed, train, evaluate), `sweep` and
`compare` (extract if needed, then the trials). A notebook calls them as the command line does; the
CLI is a shell over them (progress bars, printed lines, exit codes). Each resumes what an earlier
call left: a matching cache is reused, a run with resume=True continues, a sweep or comparison
folder picks up where it stopped.

What a caller may give, all optional:
  progress(desc, unit)  makes a progress object: called with counts as work ends, then .close()d
  log(line)             the lines training and the trials say as they go (epochs, trials ending)
  say(line)             the lines to show even where LOG shows nothing: extraction's notices, a
                        method compare leaves out
  on_stage(name, value) each stage's result as it ends, before the next starts: "extract" (its
                        summary, or None when a matching cache was ready) and "train" (TrainResult)
  stopper()             a context manager whose value is should_stop(): entered around the stage
                        that stops at a step boundary (training, the trials); extraction is not
                        inside it (a Ctrl-C ends extraction at once, its finished blocks kept)
  threads               True: torch's thread count set from extract.threads and train.threads
                        for each stage, as the CLI does (False leaves the process as it is)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from sherl_pipe.cache import Cache
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.config import Pipeline
from sherl_pipe.errors import CacheMismatch
from sherl_pipe.methods import method_names
from sherl_pipe.evaluation import evaluate
from sherl_pipe.extraction import check_serves_training
from sherl_pipe.extraction import extract as run_extract
from sherl_pipe.request import cache_ready
from sherl_pipe.training import train as run_train

Check = Callable[[Pipeline, dict, bool], None]  # (pipeline, the manifest the cache will have, overwrite)


@dataclass
class Hooks:
    """A caller's view of a flow (see the module's docstring); by default lines are printed and
    nothing else is shown."""

    progress: Callable | None = None
    log: Callable[[str], None] = print
    say: Callable[[str], None] = print
    on_stage: Callable[[str, object], None] = lambda name, value: None
    stopper: Callable | None = None
    threads: bool = False

    def bar(self, desc: str, unit: str):
        return self.progress(desc, unit) if self.progress is not None else None

    def stop(self):
        """The should_stop of the stage that stops at a step boundary (never, without a stopper)."""
        return self.stopper() if self.stopper is not None else contextlib.nullcontext(None)

    def set_threads(self, n: int) -> None:
        if self.threads:
            import torch  # only when asked: a caller that sets its own threads pays no import here

            torch.set_num_threads(n)


@dataclass
class RunResult:
    extract: object  # extraction.ExtractSummary
    train: object  # training.TrainResult
    metrics: dict | None  # evaluate's on evaluate.split; None when training was interrupted


def extract(pipeline: Pipeline, overwrite: bool = False, check: Check | None = None, scheduler: str | None = None,
            hooks: Hooks | None = None):
    """Stage one: the pipeline's cache (a matching one is finished or reused; one that differs is
    replaced only with OVERWRITE). Returns the extraction's summary."""
    hooks = hooks or Hooks()
    hooks.set_threads(pipeline.extract.threads)
    bar = hooks.bar("extract", "sample")
    try:
        return run_extract(pipeline, overwrite=overwrite, progress=bar, log=hooks.say, check=check,
                           scheduler=scheduler)
    finally:
        if bar is not None:
            bar.close()


def extract_or_replace(pipeline: Pipeline, overwrite: bool, check: Check | None, hooks: Hooks):
    """extract; a cache that differs from the pipeline is replaced only with OVERWRITE (tried
    without it first, so a matching cache is never rewritten)."""
    try:
        return extract(pipeline, False, check, hooks=hooks)
    except CacheMismatch:
        if not overwrite:
            raise
        return extract(pipeline, True, check, hooks=hooks)


def ensure_cache(pipeline: Pipeline, overwrite: bool = False, check: Check | None = None,
                 hooks: Hooks | None = None):
    """The pipeline's cache, complete and matching, extracted if it is not. CHECK runs on the
    manifest the cache has (or will have, before extracting). Returns the extraction's summary, or
    None when the cache was ready (then no model is loaded); on_stage("extract", ...) sees it."""
    hooks = hooks or Hooks()
    if cache_ready(pipeline):
        hooks.on_stage("extract", None)
        if check is not None:
            check(pipeline, Cache(pipeline_location(pipeline, training=True)).manifest, overwrite)
        return None
    summary = extract_or_replace(pipeline, overwrite, check, hooks)
    hooks.on_stage("extract", summary)
    return summary


def train(pipeline: Pipeline, resume: bool = False, overwrite: bool = False, hooks: Hooks | None = None):
    """Stage two from the cache (a run folder continued with RESUME, replaced with OVERWRITE), inside
    the caller's stopper. Returns training.TrainResult; on_stage("train", ...) sees it."""
    hooks = hooks or Hooks()
    hooks.set_threads(pipeline.train.threads)
    bar = hooks.bar("train", "step")
    try:
        with hooks.stop() as should_stop:
            result = run_train(pipeline, resume=resume, overwrite=overwrite, progress=bar, log=hooks.log,
                               should_stop=should_stop)
    finally:
        if bar is not None:
            bar.close()
    hooks.on_stage("train", result)
    return result


def run(pipeline: Pipeline, resume: bool = False, overwrite: bool = False, hooks: Hooks | None = None) -> RunResult:
    """`sherl-pipe run`: extract (reusing a matching cache; a cache the run could not use is refused
    before extracting), train, evaluate the chosen checkpoint on evaluate.split."""
    hooks = hooks or Hooks()
    summary = extract_or_replace(pipeline, overwrite, check_serves_training, hooks)
    hooks.on_stage("extract", summary)
    result = train(pipeline, resume, overwrite, hooks)
    if result.interrupted:
        return RunResult(summary, result, None)
    ev = pipeline.evaluate  # with the pipeline's storage options: the run folder keeps none of their secrets
    metrics = evaluate(result.run_dir, ev.split, ev.checkpoint, ev.batch_size,
                       storage_options=pipeline_location(pipeline, training=True).options)
    return RunResult(summary, result, metrics)


def sweep(pipeline: Pipeline, sweep_file: str | None = None, sweep_dir: str | None = None,
          scheduler: str | None = None, overwrite: bool = False, retry_failed: bool = False,
          hooks: Hooks | None = None):
    """`sherl-pipe sweep`: the cache (extracted if needed; the sweep file and its space checked
    against it first), then the sweep's trials. Returns sweep.SweepResult."""
    from sherl_pipe.sweep import plan_sweep, run_sweep  # dask and optuna: loaded by the flows that use them

    hooks = hooks or Hooks()

    def check(_pipeline, planned: dict, _overwrite: bool) -> None:
        plan_sweep(pipeline, sweep_file, sweep_dir, manifest=planned)

    ensure_cache(pipeline, overwrite, check, hooks)
    bar = hooks.bar("sweep", "trial")
    try:
        with hooks.stop() as should_stop:
            return run_sweep(pipeline, sweep_file, sweep_dir, scheduler, overwrite, progress=bar, log=hooks.log,
                             check_cache=False, should_stop=should_stop, retry_failed=retry_failed)
    finally:
        if bar is not None:
            bar.close()


def compare(pipeline: Pipeline, methods: list[str] | None = None, seeds: int = 3, live_seeds: int | None = None,
            budget: str = "epochs", tune_lr: bool = False, compare_dir: str = "sherl-compare/default",
            scheduler: str | None = None, workers: int = 0, overwrite: bool = False, retry_failed: bool = False,
            hooks: Hooks | None = None, keep: str = "best") -> dict:
    """`sherl-pipe compare`: the cache (extracted if needed; every method checked against it first),
    then every method x seed. METHODS None: every registered method, and each preset a method
    offers, that the cache serves (those it does not are left out with a line saying why).
    Returns the report (compare/report.py) with "interrupted" and "folder"."""
    from sherl_pipe.compare import compare as run_compare  # dask and optuna: loaded by the flows that use them
    from sherl_pipe.compare.run import plan_compare, servable  # (as above)
    from sherl_pipe.compare.variants import default_rows

    from sherl_pipe.training.checkpoint import check_keep

    check_keep(keep, "--keep")  # before the cache is extracted
    hooks = hooks or Hooks()
    names = default_rows(method_names()) if methods is None else list(methods)

    def check(_pipeline, planned: dict, _overwrite: bool) -> None:
        if methods is None:  # by default, the methods the cache serves, saying which it does not
            kept, left = servable(pipeline, names, planned)
            if left:
                names[:] = kept
                hooks.say(f"compare: left out {', '.join(left)}: {next(iter(left.values()))} to compare them "
                          f"too (or name the methods to compare with --methods)")
        plan_compare(pipeline, names, seeds, live_seeds, budget, tune_lr, compare_dir, planned)

    ensure_cache(pipeline, overwrite, check, hooks)
    bar = hooks.bar("compare", "trial")
    try:
        with hooks.stop() as should_stop:
            return run_compare(pipeline, names, seeds, live_seeds, budget, tune_lr, compare_dir, scheduler, workers,
                               overwrite, progress=bar, log=hooks.log, should_stop=should_stop, check_cache=False,
                               retry_failed=retry_failed, keep=keep)
    finally:
        if bar is not None:
            bar.close()
