"""The [sweep] table: how to search, checked as strictly as the pipeline's sections.

It sits in the pipeline file (or in its own file, `--sweep FILE`, which then wins) beside a
[sweep.space] table of the train settings to vary (space.py). `--set sweep.key=value` overrides a
key, as for any section; `--sweep-dir` overrides `dir`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sherl_pipe.config import Pipeline, build_section
from sherl_pipe.errors import SherlError
from sherl_pipe.metrics import selection



def _choice(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


def _at_least(default, minimum):
    return field(default=default, metadata={"min": minimum})


@dataclass(frozen=True)
class SweepConfig:
    metric: str = ""  # on train.eval_split; "" = the task's primary metric (accuracy, pearson)
    direction: str = _choice("", "maximize", "minimize")  # "" = from the metric
    sampler: str = _choice("tpe", "grid", "random")
    trials: int = _at_least(20, 0)  # trials to finish; 0 with the grid sampler: every combination
    parallel: int = _at_least(0, 0)  # trials at once; 0 = one per worker
    workers: int = _at_least(0, 0)  # worker processes of the local cluster; 0 = one per core (at most `parallel`)
    threads: int = _at_least(0, 0)  # torch threads per trial; 0 = cores / workers
    timeout: float = _at_least(0.0, 0.0)  # seconds after which no new trial starts; 0 = none
    pruner: str = _choice("none", "median", "successive-halving")
    seed: int = 0  # the sampler's seed (a trial's own seed is train.seed, which the space may vary)
    dir: str = "sherl-sweeps/default"


@dataclass(frozen=True)
class Sweep:
    config: SweepConfig
    space: dict  # the [sweep.space] table as written
    origin: str


def read_sweep_table(pipeline: Pipeline, sweep_file: str | None) -> tuple[dict, str]:
    if sweep_file is None:
        return dict(pipeline.sweep), pipeline.origin
    path = Path(sweep_file)
    if not path.is_file():
        raise SherlError(f"--sweep {sweep_file}: not found; give a TOML file with a [sweep] table")
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SherlError(f"{path}: not valid TOML ({exc})") from None
    other = sorted(set(raw) - {"sweep"})
    if other or "sweep" not in raw:
        raise SherlError(f"{path}: a sweep file holds one [sweep] table (with [sweep.space]); found "
                         f"{other or 'no [sweep]'}: put pipeline settings in the pipeline file")
    return dict(raw["sweep"]), str(path)


def load_sweep(pipeline: Pipeline, sweep_file: str | None = None, sweep_dir: str | None = None) -> Sweep:
    raw, origin = read_sweep_table(pipeline, sweep_file)
    if sweep_file is not None:  # --set sweep.* still applies on top of a sweep file
        raw.update({k: v for k, v in pipeline.sweep.items() if k != "space"})
    if not raw:
        raise SherlError(f"{origin}: no [sweep] table; add [sweep] and [sweep.space] to the pipeline file, or "
                         f"give one with --sweep FILE")
    space = raw.pop("space", None)
    if not isinstance(space, dict) or not space:
        raise SherlError(f"{origin}: [sweep.space] is missing or empty; name the train settings to vary, "
                         f"for example lr = {{low = 1e-4, high = 1e-2, log = true}}")
    if sweep_dir is not None:
        raw["dir"] = sweep_dir
    return Sweep(build_section("sweep", raw, origin, cls=SweepConfig), space, origin)


def resolve_metric(cfg: SweepConfig, task_type: str, origin: str) -> tuple[str, str]:
    """(metric, direction): the configured ones, or the task's primary metric and its direction."""
    metric, direction = selection(task_type, cfg.metric, f"{origin}: sweep.metric")
    return metric, cfg.direction or direction
