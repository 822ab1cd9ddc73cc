"""One phase of a comparison: a study folder (the engine's) holding exactly the phase's trials,
queued (fixed parameters: method, seed, epochs, lr), run by the engine's coordinator.
A rerun queues only the trials the study does not hold yet, so it resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

from sherl_pipe.compare.trial import job_folder
from sherl_pipe.compare.trial import run_compare_trial
from sherl_pipe.engine import Coordinator, Param, Plan, finished_count, first_cause, is_rerun_error, open_study
from sherl_pipe.engine import prepare_folder, recover_interrupted, repair_journal, retry_failed, signature, trial_dir

KEYS = ("method", "seed", "epochs", "lr", "lr_late")
EARLIER_KEYS = KEYS[:4]  # compare folders made before lr_late was a trial parameter


def params_for(trials: list[dict]) -> list[Param]:
    return [Param(k, "categorical", tuple(sorted({t[k] for t in trials}, key=str))) for k in KEYS]


def phase_pipeline(c, name: str):
    """The pipeline a phase's trials start from: at --budget time the final runs stop at the budget
    (train.max_seconds), so that no method trains past it (full fine-tuning's own runs excepted:
    compare/trial.py). The phase's signature stays the comparison's pipeline, so a final phase
    started before the budget was enforced, or under another budget, still resumes."""
    if name == "final" and c.budget == "time" and c.budget_seconds:
        return c.pipeline.with_overrides("train", max_seconds=float(c.budget_seconds))
    return c.pipeline


def open_phase(c, folder: Path, trials: list[dict]):
    """The phase's study (created, or resumed: its signature is the base pipeline and metric), with
    every trial of TRIALS that it neither holds nor queues put in its queue."""

    params = params_for(trials)
    # the signature of a random search with no space: what a phase was when it ran on the sweep's code
    sig = signature([], c.pipeline.to_dict(), c.metric, c.direction, sampler="random", seed=0)
    study = open_study(folder, sig, c.direction)
    recover_interrupted(study, folder)
    if getattr(c, "retry_failed", False):  # queued below, as interrupted trials are (planned ones only)
        retry_failed(study, folder, requeue=False, only={json.dumps(t, sort_keys=True) for t in trials},
                     normalise=lambda p: with_lr_late(p, c.rates))
    held = [with_lr_late(t.params or t.system_attrs.get("fixed_params", {}), c.rates)
            for t in study.get_trials(deepcopy=False) if not stopped_before_its_end(t, folder)]
    done_or_queued = {json.dumps(p, sort_keys=True) for p in held}
    for t in trials:
        if json.dumps(t, sort_keys=True) not in done_or_queued:
            study.enqueue_trial(t, skip_if_exists=False)
    return study, params


def with_lr_late(params: dict, rates: dict | None) -> dict:
    """A trial from before lr_late was a trial parameter trained at its method's pretrained rate as
    this comparison resolves it (the study's signature pins the pipeline), so it is given that one."""
    if "lr_late" in params or rates is None or params.get("method") not in rates:
        return params
    return {**params, "lr_late": rates[params["method"]][1]}


def stopped_before_its_end(t, folder: Path) -> bool:
    """A trial recorded as interrupted or lost: its parameters still have to run (a killed compare
    left trials running that had not drawn their parameters yet, which nothing requeued: they
    counted as held, and the phase filled its count with sampled settings instead)."""

    error = trial_dir(folder, t.number) / "error.txt"
    return t.state.name == "FAIL" and error.is_file() and is_rerun_error(error.read_text())


def results_of(study, folder: Path, rates: dict | None = None) -> list[dict]:
    """Every finished trial's parameters with its job's result (failed ones: with their error); an
    earlier folder's trials get lr_late from RATES (see with_lr_late), or none without them."""

    out = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished() or set(t.params) not in (set(KEYS), set(EARLIER_KEYS)):
            continue
        result = job_folder(str(trial_dir(folder, t.number))) / "result.json"
        error = trial_dir(folder, t.number) / "error.txt"
        row = {**with_lr_late(t.params, rates), "number": t.number, "state": t.state.name.lower(),
               "phase": folder.name}
        if t.state.name == "COMPLETE" and result.is_file():
            row.update(json.loads(result.read_text()))
        elif error.is_file():
            row["error"] = first_cause(error.read_text())  # below a --retry-failed mark
        out.append(row)
    return out


def run_phase(c, name: str, trials: list[dict], eng, progress, log, should_stop,
              parallel: int | None = None) -> tuple[list[dict], bool]:
    """PARALLEL: at most this many trials at once (default: one per worker)."""

    folder = c.folder / name
    lock = prepare_folder(folder, overwrite=False)
    try:
        repair_journal(folder, log)
        pipeline = phase_pipeline(c, name)
        study, params = open_phase(c, folder, trials)
        parallel = min(parallel or eng.workers, eng.workers)
        plan = Plan(pipeline, params, c.metric, c.direction, folder, len(trials), parallel, 0.0, c.fingerprint,
                    keep=c.keep)
        log(f"compare {name}: {len(trials)} trial(s), {finished_count(study, folder)} done, on {eng.where}"
            + (", one at a time (timed)" if parallel < eng.workers else ""))
        if progress is not None and hasattr(progress, "set_total"):
            progress.set_total(len(trials))
            progress(finished_count(study, folder))
        tally = Coordinator(plan, study, eng, run_compare_trial, progress, log, should_stop).run()
        results = results_of(study, folder, c.rates)
        return [r for r in results if r["state"] != "fail" or "error" in r], tally.interrupted
    finally:
        lock.release()
