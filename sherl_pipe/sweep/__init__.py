"""`sherl-pipe sweep`: many training trials over one cache, searched with Optuna, run on dask.

    config.py   the [sweep] table          space.py    the settings to vary, checked up front
    search.py   the sampler and pruner     trial.py    one trial on a worker: train
    report.py   trials.csv, leaderboard, best.toml      plots.py    the PNG plots

The study on disk, the cluster and the loop that runs trials on it are the engine's
(sherl_pipe/engine/), which compare shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sherl_pipe.config import Pipeline, absolute_paths
from sherl_pipe.errors import SherlError
from sherl_pipe.cache import Cache
from sherl_pipe.cache import manifest_fingerprint
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.request import check_cache_matches
from sherl_pipe.request import check_splits, check_test_rows_do_not_choose
from sherl_pipe.engine import Coordinator, Plan, finished_count, open_study, prepare_folder, recover_interrupted
from sherl_pipe.engine import repair_journal, retry_failed, signature, start_cluster
from sherl_pipe.sweep import search
from sherl_pipe.sweep.config import load_sweep, resolve_metric
from sherl_pipe.sweep.report import build_report
from sherl_pipe.sweep.space import check_space, grid, grid_size, parse_space
from sherl_pipe.sweep.trial import run_trial


@dataclass
class SweepResult:
    sweep_dir: Path
    report: object  # report.Report
    recovered: list[int]
    engine: str
    threads: int
    interrupted: bool = False  # Ctrl-C: the running trials were recorded as interrupted, to run again
    again: int = 0  # trials recorded to run again (interrupted, or lost with their worker)


def plan_sweep(pipeline: Pipeline, sweep_file: str | None, sweep_dir: str | None, manifest: dict | None = None):
    """The sweep's settings and space, checked against the pipeline and its cache (or, before the
    cache is made, the manifest it will have: extraction.planned_manifest) before anything runs."""

    sweep = load_sweep(pipeline, sweep_file, sweep_dir)
    cfg = sweep.config
    if not pipeline.train.eval_split:
        raise SherlError(f"{pipeline.origin}: a sweep ranks trials on train.eval_split; set it (for example "
                         f"validation, or data.validation_size to carve one out of data.train)")
    check_test_rows_do_not_choose(pipeline, "a sweep", "the best trial (best.toml) and each trial's best epoch, "
                                                   "and `evaluate` would then score that choice on the same rows")
    manifest = manifest or Cache(pipeline_location(pipeline, training=True)).manifest
    check_splits(pipeline.train, list(manifest["splits"]), f"cache {pipeline.extract.cache}")
    metric, direction = resolve_metric(cfg, manifest["task"]["type"], sweep.where("metric"))
    if metric == "f1_positive" and len(manifest["task"]["label_names"]) != 2:
        raise SherlError(f"{sweep.where('metric')}: sweep.metric = 'f1_positive' needs two classes")
    params = parse_space(sweep.space, sweep.where)
    check_space(params, pipeline, manifest, sweep.where)
    if cfg.sampler == "grid":
        grid(params, sweep.where("sampler"))  # every parameter a list of values
        budget = min(cfg.trials, grid_size(params)) if cfg.trials else grid_size(params)
    elif cfg.trials:
        budget = cfg.trials
    else:
        raise SherlError(f"{sweep.where('trials')}: sweep.trials = 0 means every combination, for the grid "
                         f"sampler only; set sweep.trials")
    return cfg, Plan(absolute_paths(pipeline), params, metric, direction, Path(cfg.dir).absolute(), budget,
                     cfg.parallel, cfg.timeout, keep=cfg.keep)


def run_sweep(pipeline: Pipeline, sweep_file: str | None = None, sweep_dir: str | None = None,
              scheduler: str | None = None, overwrite: bool = False, progress=None,
              log: Callable[[str], None] = print, trial_fn: Callable | None = None,
              check_cache: bool = True, should_stop: Callable[[], bool] | None = None,
              retry_failed: bool = False) -> SweepResult:
    """Run (or resume) the pipeline's sweep over its cache, which must exist and match (checked here
    unless check_cache=False: the caller has just checked or made it). `should_stop()` is polled:
    once true, no trial starts and the running ones stop at their next step, to run again on resume.
    RETRY_FAILED: trials that failed run again (after the cause is fixed: a repaired cache)."""

    cache = Cache(pipeline_location(pipeline, training=True))
    if check_cache:
        check_cache_matches(cache, pipeline)
    cfg, plan = plan_sweep(pipeline, sweep_file, sweep_dir)
    plan.cache_fingerprint = manifest_fingerprint(cache.manifest)
    lock = prepare_folder(plan.sweep_dir, overwrite)
    try:
        repair_journal(plan.sweep_dir, log)
        recovered, tally, where, threads = _run_trials(pipeline, cfg, plan, scheduler, progress, log, trial_fn,
                                                       should_stop, cache.manifest["backbone"]["model_type"],
                                                       retry_failed)
    finally:
        lock.release()
    return SweepResult(plan.sweep_dir, build_report(plan.sweep_dir), recovered, where, threads, tally.interrupted,
                       tally.again)


def _run_trials(pipeline, cfg, plan, scheduler, progress, log, trial_fn, should_stop, model_type, retry=False):
    sig = signature([p.to_dict() for p in plan.params], pipeline.to_dict(), plan.metric, plan.direction,
                    cfg.sampler, cfg.seed)
    study = open_study(plan.sweep_dir, sig, plan.direction,
                       lambda done: search.make_sampler(cfg, plan.params, pipeline.origin, done),
                       search.make_pruner(cfg), plan.cache_fingerprint)
    # the pipeline with its method settings as given (the signature writes every key out): what
    # best.toml lays the best values over, as each trial's are laid (a swept preset then sets the keys
    # the pipeline leaves unset)
    study.set_user_attr("pipeline_given", pipeline.to_dict(given=True))
    recovered = recover_interrupted(study, plan.sweep_dir)
    if retry:
        retried = retry_failed(study, plan.sweep_dir)
        log(f"trials {retried} failed before: they run again" if retried else "no failed trial to run again")
    if recovered:
        log(f"trials {recovered} were running when the sweep stopped: recorded as interrupted, to run again")
    with start_cluster(scheduler, model_type, cfg.workers, cfg.threads, cfg.parallel,
                       warm=("sherl_pipe.sweep.trial",)) as eng:
        plan.parallel = min(plan.parallel or eng.workers, eng.workers)
        if cfg.parallel > eng.workers:
            log(f"sweep.parallel = {cfg.parallel}: {eng.workers} trials at a time, one per worker process (a "
                f"trial's random draws and threads are its process's own)")
        log(f"sweep {plan.sweep_dir}: {plan.budget} trials, {plan.parallel} at a time on {eng.where}, "
            f"{eng.threads} torch thread(s) per trial; {plan.metric} on {pipeline.train.eval_split} ({plan.direction})")
        if progress is not None and hasattr(progress, "set_total"):
            progress.set_total(plan.budget)
            progress(finished_count(study, plan.sweep_dir))
        tally = Coordinator(plan, study, eng, trial_fn or run_trial, progress, log, should_stop).run()
        return recovered, tally, eng.where, eng.threads
