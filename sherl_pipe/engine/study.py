"""The study on disk: one Optuna study in a journal file in its folder (a sweep's, or one phase of
a comparison), owned by the process that coordinates its trials.

The coordinator asks the study for trials and tells it their results (ask-and-tell): workers never
touch the study, so any dask cluster can run them. One process holds the folder at a time (a lock,
see lock_folder). A rerun of the same command loads the study: finished trials are kept; trials
that were running when it stopped (Ctrl-C, a killed process) or whose worker died are recorded as
failed with the reason ("interrupted", "lost") and their parameters queued to run again; those do
not count against the budget. A rerun with another space, metric, sampler, base pipeline or cache
is refused unless --overwrite. The folders were sweeps' first: the messages still call them so.
"""

from __future__ import annotations

import json
from pathlib import Path

from sherl_pipe.errors import SherlError, naming
from sherl_pipe.folders import clear_folder, ensure_writable, has_files, refuse_cwd
from sherl_pipe.locks import FolderLock
from sherl_pipe.atomic import write_atomically
from sherl_pipe.config import upgrade_saved
from sherl_pipe.methods import effective_train

STUDY_NAME = "sherl-sweep"
JOURNAL = "study.journal"
INTERRUPTED = "interrupted: the sweep stopped while this trial ran; it runs again as another trial"
LOST = ("lost: the worker running this trial died (killed from outside, or out of memory); it runs again as "
        "another trial")
LOST_AGAIN = ("failed: the worker running this trial died, as it did for the trial this one reran: the trial "
              "itself may exhaust the worker's memory; it is not run again")
RETRIED = "retried: this trial failed and is run again on request (--retry-failed); its error was:"
RERUN = tuple(reason.split(":")[0] + ":" for reason in (INTERRUPTED, LOST, RETRIED))  # trials run again
LOCK = "lock.json"


def quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage(sweep_dir: Path):
    optuna = quiet_optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))


# Where a sweep's pieces run and how they reach the cache, not what they compute
NOT_SIGNED = {"train": ("run_dir", "threads", "storage_options"),
              "extract": ("workers", "storage_options", "lease_seconds")}


def _signed(base: dict) -> dict:
    out = {s: ({k: v for k, v in body.items() if k not in NOT_SIGNED.get(s, ())} if isinstance(body, dict) else body)
           for s, body in base.items()}
    if "train" in out:
        out["train"] = effective_train(out["train"])
    return out


def signature(space: list[dict], base: dict, metric: str, direction: str, sampler: str, seed: int) -> dict:
    """What makes two runs of a study the same (where it runs and how fast do not count): SPACE the
    parameters' descriptions (space.Param.to_dict), BASE the pipeline as a dict, SAMPLER and SEED
    the search's."""
    base = _signed(base)
    return json.loads(json.dumps({"space": space, "metric": metric, "direction": direction,
                                  "sampler": sampler, "seed": seed, "pipeline": base}))


def upgraded(sig: dict) -> dict:
    """A stored signature with the pipeline keys its sherl-pipe lacked (config.upgrade_saved)."""

    return {**sig, "pipeline": _signed(upgrade_saved(sig.get("pipeline", {})))}


def _pipeline_diff(kept: dict, sig: dict) -> str:
    """ (section.key: sweep has X, request has Y; ...) for the base pipeline's differing keys."""
    a, b = kept.get("pipeline", {}), sig["pipeline"]
    diffs = [f"{s}.{k}: sweep has {a.get(s, {}).get(k)!r}, request has {v!r}"
             for s in b for k, v in b[s].items() if a.get(s, {}).get(k) != v]
    return f" ({'; '.join(diffs[:4])})" if diffs else ""


def is_sweep_folder(path: Path) -> bool:
    return (path / JOURNAL).is_file()


def prepare_folder(sweep_dir: Path, overwrite: bool) -> FolderLock:
    """Check, create and lock the sweep folder (emptied with --overwrite once locked); returns the lock."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SherlError(f"sweep folder {sweep_dir}: is a file; set sweep.dir (or --sweep-dir) to a folder")
    if sweep_dir.is_dir() and has_files(sweep_dir) and not is_sweep_folder(sweep_dir):
        raise SherlError(f"sweep folder {sweep_dir}: exists and is not a sherl-pipe sweep folder (no {JOURNAL}); "
                         f"it is never deleted: set sweep.dir (or --sweep-dir) to another folder")
    if overwrite and is_sweep_folder(sweep_dir):
        refuse_cwd(sweep_dir, "sweep folder")
    ensure_writable(sweep_dir, "sweep folder")
    lock = lock_folder(sweep_dir)
    try:
        if overwrite and is_sweep_folder(sweep_dir):
            clear_folder(sweep_dir)  # keeps the folder, and so the lock on it
        _write_holder(sweep_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def lock_folder(sweep_dir: Path) -> FolderLock:
    """One sweep process per folder: a second would ask the same study for trials and rerun the
    first's live trials as 'interrupted'. The lock is flock on the folder (the kernel drops it when
    its process dies, so a killed sweep's lock is taken over); lock.json only names the holder."""
    lock = FolderLock(sweep_dir)
    if not lock.acquire(wait=False):
        raise SherlError(f"sweep folder {sweep_dir}: another sherl-pipe sweep is running in it ({_holder(sweep_dir)}); "
                         f"wait for it to finish, or set sweep.dir (or --sweep-dir) to another folder")
    return lock


def _write_holder(sweep_dir: Path) -> None:
    import datetime
    import os
    import socket


    since = datetime.datetime.now().isoformat(timespec="seconds")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    write_atomically(sweep_dir / LOCK, (json.dumps(holder) + "\n").encode())


def _holder(sweep_dir: Path) -> str:
    try:
        h = json.loads((sweep_dir / LOCK).read_text())
        return f"pid {h['pid']} on {h['host']}, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def repair_journal(sweep_dir: Path, log) -> None:
    """Drop a partial last record (a sweep killed, or a disk filled, while writing it): Optuna
    skips it when reading but would append the next record to it, making the journal unreadable.
    Called while the folder is locked, so no other process is writing it."""
    path = sweep_dir / JOURNAL
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with naming(path), open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        log(f"sweep folder {sweep_dir}: dropped a partial last record of {JOURNAL} (the sweep stopped while "
            f"writing it)")


def open_study(sweep_dir: Path, sig: dict, direction: str, sampler=None, pruner=None,
               cache_fingerprint: str | None = None):
    """The folder's study: created, or loaded and checked against this request and its cache (the
    manifest fingerprint; sweeps made before it was kept take it on). SAMPLER(done) is the search's
    sampler given the number of trials the study holds (None: random, for queued trials only);
    PRUNER is Optuna's (None: none)."""
    optuna = quiet_optuna()
    sampler = sampler or (lambda done: optuna.samplers.RandomSampler(seed=done))
    with naming(sweep_dir / JOURNAL):
        study = optuna.create_study(storage=storage(sweep_dir), study_name=STUDY_NAME, load_if_exists=True,
                                    direction=direction, sampler=sampler(0),
                                    pruner=pruner or optuna.pruners.NopPruner())
    if "signature" not in study.user_attrs:  # new, or a journal cut short before its first records
        study.set_user_attr("signature", sig)
    elif (kept := upgraded(study.user_attrs["signature"])) != sig:
        differs = sorted(k for k in sig if kept.get(k) != sig[k])
        raise SherlError(f"sweep folder {sweep_dir}: holds a sweep with another {', '.join(differs)}"
                         f"{_pipeline_diff(kept, sig)}; rerun it as it was to resume it, use --overwrite to start "
                         f"again, or set sweep.dir (or --sweep-dir)")
    else:
        study.sampler = sampler(len(study.get_trials(deepcopy=False)))
    if cache_fingerprint is not None:
        kept = study.user_attrs.get("cache_fingerprint")
        if kept is not None and kept != cache_fingerprint:
            raise SherlError(f"sweep folder {sweep_dir}: its trials were trained on another cache than "
                             f"extract.cache (the manifest fingerprint differs); resume it with that cache, use "
                             f"--overwrite to start again, or set sweep.dir (or --sweep-dir)")
        if kept is None:
            study.set_user_attr("cache_fingerprint", cache_fingerprint)
    return study


def finished_count(study, sweep_dir: Path) -> int:
    """Trials that count against the budget: every ended one except those run again."""
    from optuna.trial import TrialState

    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        error = trial_dir(sweep_dir, t.number) / "error.txt"
        if not (t.state == TrialState.FAIL and error.is_file() and is_rerun_error(error.read_text())):
            count += 1
    return count


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "trials" / f"{number:04d}"


def record_error(sweep_dir: Path, number: int, text: str) -> None:
    """Why a trial failed, in its folder (the study keeps only its state)."""

    folder = trial_dir(sweep_dir, number)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "error.txt", text.encode())


def run_again(study, sweep_dir: Path, trial, reason: str) -> None:
    """Record a trial as failed for REASON (INTERRUPTED, LOST) and queue its parameters to run
    again. A trial stopped before it had all its parameters never ran: failed, not queued."""
    from optuna.trial import TrialState

    record_error(sweep_dir, trial.number, reason)
    study.tell(trial.number, state=TrialState.FAIL)
    queue_again(study, trial, lost=int(trial.user_attrs.get("lost", 0)) + (reason == LOST))


def trial_params(trial) -> dict:
    """A trial's parameters: those it drew, and a queued trial's fixed ones (fixed before it draws
    them: compare's trials, whose study has no space)."""
    return {**getattr(trial, "system_attrs", {}).get("fixed_params", {}), **trial.params}


def queue_again(study, trial, **attrs) -> None:
    """Queue TRIAL's parameters as a new trial (ATTRS beside rerun_of); a trial stopped before it
    had all its parameters is not queued (an empty requeue would run whatever the sampler drew)."""
    keys = {p["key"] for p in study.user_attrs["signature"]["space"]}
    params = trial_params(trial)
    if params and keys <= set(params):
        study.enqueue_trial(params, user_attrs={"rerun_of": trial.number, **attrs}, skip_if_exists=False)


def first_cause(text: str) -> str:
    """An error.txt's first line; below a --retry-failed mark (RETRIED), the error it marks."""
    lines = [x for x in text.splitlines() if x.strip()]
    if lines and lines[0] == RETRIED and len(lines) > 1:
        return f"{lines[1]} (retried)"
    return lines[0] if lines else ""


def is_rerun_error(text: str) -> bool:
    return text.startswith(RERUN)


def retry_failed(study, sweep_dir: Path, requeue: bool = True, only: set[str] | None = None,
                 normalise=lambda params: params) -> list[int]:
    """Trials that failed (a damaged cache since repaired, a full disk since freed) marked to run
    again (their error kept below the mark), and with REQUEUE their parameters queued; a compare
    phase queues them itself (phase.stopped_before_its_end), and marks only those whose parameters,
    NORMALISE-d and as JSON, are in ONLY (its planned trials: another would not count as run, and
    the phase would fill its count with a trial nobody planned)."""
    import json

    from optuna.trial import TrialState

    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        error = trial_dir(sweep_dir, t.number) / "error.txt"
        text = error.read_text() if error.is_file() else ""
        planned = only is None or json.dumps(normalise(trial_params(t)), sort_keys=True) in only
        if is_rerun_error(text) or not planned:
            continue
        record_error(sweep_dir, t.number, f"{RETRIED}\n{text}")
        if requeue:
            queue_again(study, t)
        retried.append(t.number)
    return retried


def recover_interrupted(study, sweep_dir: Path) -> list[int]:
    """Trials left running by a sweep that stopped (killed): recorded as interrupted, run again."""
    from optuna.trial import TrialState

    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_again(study, sweep_dir, t, INTERRUPTED)
        recovered.append(t.number)
    return recovered


def load_study(sweep_dir: Path):
    """An existing sweep's study, for reports (also while the sweep runs)."""
    optuna = quiet_optuna()
    if not is_sweep_folder(sweep_dir):
        raise SherlError(f"sweep folder {sweep_dir}: no {JOURNAL}; give the folder of a `sherl-pipe sweep`")
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=storage(sweep_dir))
    except KeyError:  # the sweep creates the journal a moment before it writes the study into it
        raise SherlError(f"sweep folder {sweep_dir}: {JOURNAL} holds no study yet (the sweep is starting, or "
                         f"stopped before its first record); wait and report again, or rerun the sweep") from None
