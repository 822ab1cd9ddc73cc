"""One Optuna study per sweep, in a journal file in the sweep folder, owned by the sweep process.

The sweep asks the study for trials and tells it their results (ask-and-tell): workers never touch
the study, so any dask cluster can run them. A rerun of the same command loads the study: finished
trials are kept; trials that were running when the sweep stopped are recorded as failed
("interrupted") and their parameters queued to run again. A rerun with another space, metric,
sampler or base pipeline is refused unless --overwrite.
"""

from __future__ import annotations

import json
from pathlib import Path

from sherl_pipe.errors import SherlError
from sherl_pipe.folders import clear_folder, has_files, refuse_cwd
from sherl_pipe.sweep.config import SweepConfig
from sherl_pipe.sweep.space import Param, grid

STUDY_NAME = "sherl-sweep"
JOURNAL = "study.journal"
INTERRUPTED = "interrupted: the sweep stopped while this trial ran; it runs again as another trial"


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage(sweep_dir: Path):
    optuna = _quiet_optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))


def make_sampler(cfg: SweepConfig, params: list[Param], origin: str, done: int = 0):
    """The sweep's sampler. DONE is the number of trials the study already holds: a resumed random
    or TPE search seeded with sweep.seed alone would draw the first trials' settings again (the
    grid sampler skips the points it has visited), so its seed moves on by that number."""
    optuna = _quiet_optuna()
    if cfg.sampler == "grid":

        class SweepGridSampler(optuna.samplers.GridSampler):
            """GridSampler stops the study once its grid is used up, which works only inside
            study.optimize(); with ask-and-tell the sweep's own trial budget ends the search."""

            def after_trial(self, study, trial, state, values):
                return None

        return SweepGridSampler(grid(params, origin), seed=cfg.seed)
    seed = cfg.seed + done
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: SweepConfig):
    optuna = _quiet_optuna()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if cfg.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def signature(cfg: SweepConfig, params: list[Param], base: dict, metric: str, direction: str) -> dict:
    """What makes two runs of a sweep the same sweep (where it runs and how fast do not count)."""
    base = {**base, "train": {k: v for k, v in base["train"].items() if k not in ("run_dir", "threads")}}
    return json.loads(json.dumps({"space": [p.to_dict() for p in params], "metric": metric, "direction": direction,
                                  "sampler": cfg.sampler, "seed": cfg.seed, "pipeline": base}))


def is_sweep_folder(path: Path) -> bool:
    return (path / JOURNAL).is_file()


def prepare_folder(sweep_dir: Path, overwrite: bool) -> None:
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SherlError(f"sweep folder {sweep_dir}: is a file; set sweep.dir (or --sweep-dir) to a folder")
    if sweep_dir.is_dir() and has_files(sweep_dir) and not is_sweep_folder(sweep_dir):
        raise SherlError(f"sweep folder {sweep_dir}: exists and is not a sherl-pipe sweep folder (no {JOURNAL}); "
                         f"it is never deleted: set sweep.dir (or --sweep-dir) to another folder")
    if overwrite and is_sweep_folder(sweep_dir):
        refuse_cwd(sweep_dir, "sweep folder")
        clear_folder(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)


def open_study(sweep_dir: Path, cfg: SweepConfig, params: list[Param], sig: dict, direction: str, origin: str):
    """The sweep's study: created, or loaded and checked against this request."""
    optuna = _quiet_optuna()
    existed = (sweep_dir / JOURNAL).is_file()
    study = optuna.create_study(storage=storage(sweep_dir), study_name=STUDY_NAME, load_if_exists=True,
                                direction=direction, sampler=make_sampler(cfg, params, origin),
                                pruner=make_pruner(cfg))
    if not existed:
        study.set_user_attr("signature", sig)
    elif study.user_attrs.get("signature") != sig:
        differs = sorted(k for k in sig if study.user_attrs.get("signature", {}).get(k) != sig[k])
        raise SherlError(f"sweep folder {sweep_dir}: holds a sweep with another {', '.join(differs)}; rerun it as it "
                         f"was to resume it, use --overwrite to start again, or set sweep.dir (or --sweep-dir)")
    else:
        study.sampler = make_sampler(cfg, params, origin, done=len(study.get_trials(deepcopy=False)))
    return study


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / "trials" / f"{number:04d}"


def record_error(sweep_dir: Path, number: int, text: str) -> None:
    """Why a trial failed, in its folder (the study keeps only its state)."""
    from sherl_pipe.atomic import write_atomically

    folder = trial_dir(sweep_dir, number)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "error.txt", text.encode())


def recover_interrupted(study, sweep_dir: Path, keys: list[str]) -> list[int]:
    """Trials left running by a sweep that stopped: failed ('interrupted'), their parameters queued
    again. A trial stopped before it had all its parameters never ran: it is failed, not queued."""
    from optuna.trial import TrialState

    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record_error(sweep_dir, t.number, INTERRUPTED)
        study.tell(t.number, state=TrialState.FAIL)
        if set(t.params) == set(keys):
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number}, skip_if_exists=False)
        recovered.append(t.number)
    return recovered


def load_study(sweep_dir: Path):
    """An existing sweep's study, for reports (also while the sweep runs)."""
    optuna = _quiet_optuna()
    if not is_sweep_folder(sweep_dir):
        raise SherlError(f"sweep folder {sweep_dir}: no {JOURNAL}; give the folder of a `sherl-pipe sweep`")
    return optuna.load_study(study_name=STUDY_NAME, storage=storage(sweep_dir))
