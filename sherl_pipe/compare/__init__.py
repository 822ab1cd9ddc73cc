"""`sherl-pipe compare`: which method gives this data the most accuracy for its memory and time.

    run.py      the phases (calibrate, tune, final) and the budgets
    phase.py    one phase: queued trials on the sweep engine
    trial.py    a trial on a worker: job.py in a child process
    job.py      train, measure, evaluate on test (a process of its own)
    measure.py  peak memory above idle; the training state's bytes
    report.py   compare.csv, compare.md (paired bootstrap), plots.py: the pictures
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sherl_pipe.config import Pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.compare.report import build_report
from sherl_pipe.compare.run import plan_compare, run_compare, save_plan
from sherl_pipe.training.checkpoint import check_keep
from sherl_pipe.folders import clear_folder, ensure_writable, has_files, refuse_cwd
from sherl_pipe.request import check_cache_matches


def prepare_compare_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise SherlError(f"compare folder {folder}: is a file; give --compare-dir a folder")
    mine = (folder / "compare.json").is_file()
    if folder.is_dir() and has_files(folder) and not mine:
        raise SherlError(f"compare folder {folder}: exists and is not a sherl-pipe compare folder (no compare.json); "
                         f"it is never deleted: give --compare-dir another folder")
    if overwrite and mine:
        refuse_cwd(folder, "compare folder")
        clear_folder(folder)
    ensure_writable(folder, "compare folder")


def compare(pipeline: Pipeline, methods: list[str], seeds: int = 3, live_seeds: int | None = None,
            budget: str = "epochs", tune_lr: bool = False, compare_dir: str = "sherl-compare/default",
            scheduler: str | None = None, workers: int = 0, overwrite: bool = False, progress=None,
            log: Callable[[str], None] = print, should_stop=None, check_cache: bool = True,
            retry_failed: bool = False, keep: str = "best") -> dict:
    """Run (or resume) a comparison over the pipeline's cache, which must exist and match (checked
    here unless check_cache=False); returns the report (compare/report.py) and whether it was
    interrupted. RETRY_FAILED: trials that failed run again (once their cause is fixed). KEEP: "best"
    (a scored trial keeps its best weights, metrics and summary; its resume state and last-epoch
    weights are dropped) or "all"."""

    cache = Cache(pipeline_location(pipeline, training=True))
    if check_cache:
        check_cache_matches(cache, pipeline)
    c = plan_compare(pipeline, methods, seeds, live_seeds, budget, tune_lr, compare_dir, cache.manifest)
    check_keep(keep, "--keep")
    c.fingerprint, c.retry_failed, c.keep = manifest_fingerprint(cache.manifest), retry_failed, keep
    prepare_compare_folder(c.folder, overwrite)
    save_plan(c)
    out = run_compare(c, scheduler, workers, progress, log, should_stop, cache.manifest["backbone"]["model_type"])
    return {**build_report(c.folder), "interrupted": out["interrupted"], "folder": c.folder}
