"""How a sweep searches: its sampler and pruner, made from the [sweep] table (the study they drive
lives in engine/study.py)."""

from __future__ import annotations

from sherl_pipe.engine import quiet_optuna
from sherl_pipe.sweep.config import SweepConfig
from sherl_pipe.sweep.space import Param, grid


def make_sampler(cfg: SweepConfig, params: list[Param], origin: str, done: int = 0):
    """The sweep's sampler. DONE is the number of trials the study already holds: a resumed random
    or TPE search seeded with sweep.seed alone would draw the first trials' settings again (the
    grid sampler skips the points it has visited), so its seed moves on by that number."""
    optuna = quiet_optuna()
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
    optuna = quiet_optuna()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if cfg.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()
