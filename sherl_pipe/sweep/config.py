"""The [sweep] table: how to search, checked as strictly as the pipeline's sections.

It sits in the pipeline file and/or in its own file (`--sweep FILE`), beside a [sweep.space] table
of the train settings to vary (space.py). Order, later winning: defaults < the pipeline's [sweep]
< --sweep FILE < `--set sweep.key=value` < `--sweep-dir`. A file's [sweep.space] replaces the one
below it; `--set sweep.space.KEY=VALUE` sets one key of it. Errors name the source of the value.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sherl_pipe.config import Pipeline, build_section
from sherl_pipe.errors import SherlError
from sherl_pipe.fields import at_least, choice
from sherl_pipe.metrics import selection


@dataclass(frozen=True)
class SweepConfig:
    metric: str = ""  # on train.eval_split; "" = the task's primary metric (accuracy, pearson)
    direction: str = choice("", "maximize", "minimize")  # "" = from the metric
    sampler: str = choice("tpe", "grid", "random")
    trials: int = at_least(20, 0)  # trials to finish; 0 with the grid sampler: every combination
    parallel: int = at_least(0, 0)  # trials at once; 0 = one per worker (never more: one trial per process)
    workers: int = at_least(0, 0)  # worker processes of the local cluster; 0 = one per core (at most `parallel`)
    threads: int = at_least(0, 0)  # torch threads per trial; 0 = cores / workers
    timeout: float = at_least(0.0, 0.0)  # seconds after which no new trial starts; 0 = none
    pruner: str = choice("none", "median", "successive-halving")
    seed: int = 0  # the sampler's seed (a trial's own seed is train.seed, which the space may vary)
    dir: str = "sherl-sweeps/default"
    keep: str = choice("best", "all")  # a scored trial's checkpoints: its best weights only, or all (resume state too)


@dataclass(frozen=True)
class Sweep:
    config: SweepConfig
    space: dict  # [sweep.space] as the layers left it
    origin: str  # where [sweep.space] came from
    origins: dict = field(default_factory=dict)  # a [sweep] key, or "space.KEY", -> where its value came from

    def where(self, key: str) -> str:
        """The source of KEY's value, for an error about it: a file, or the --set that gave it."""
        return self.origins.get(key, self.origin)


def read_sweep_file(sweep_file: str) -> tuple[dict, str]:
    path = Path(sweep_file)
    if not path.is_file():
        raise SherlError(f"--sweep {sweep_file}: not found; give a TOML file with a [sweep] table")
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SherlError(f"{path}: not valid TOML ({exc})") from None
    other = sorted(set(raw) - {"sweep"})
    if other or "sweep" not in raw or not isinstance(raw["sweep"], dict):
        raise SherlError(f"{path}: a sweep file holds one [sweep] table (with [sweep.space]); found "
                         f"{other or 'no [sweep]'}: put pipeline settings in the pipeline file")
    return dict(raw["sweep"]), str(path)


def sweep_layers(pipeline: Pipeline, sweep_file: str | None) -> list[tuple[dict, str]]:
    """The [sweep] tables in the documented order, each with its source: the pipeline's own,
    then --sweep FILE, then each --set sweep.KEY=VALUE (sweep.space.KEY sets one key of the space)."""
    layers = [(dict(pipeline.sweep), pipeline.origin)]
    if sweep_file is not None:
        layers.append(read_sweep_file(sweep_file))
    for item, key, value in pipeline.sweep_sets:
        table = {"space": {key[len("space."):]: value}} if key.startswith("space.") else {key: value}
        layers.append((table, f"--set {item}"))
    return layers


def _merge_space(space: dict | None, table, origin: str, origins: dict, replace: bool) -> dict:
    if not isinstance(table, dict):
        raise SherlError(f"{origin}: [sweep.space] must be a table of train settings")
    if replace:  # a file's space is a whole search: it replaces the one below it
        origins = {k: v for k, v in origins.items() if not k.startswith("space.")}
        space = {}
    origins.update({f"space.{k}": origin for k in table})
    return {**(space or {}), **table}


def load_sweep(pipeline: Pipeline, sweep_file: str | None = None, sweep_dir: str | None = None) -> Sweep:
    """The sweep settings: defaults < the pipeline's [sweep] < --sweep FILE < --set sweep.* <
    --sweep-dir, each value checked against the source that gave it."""
    raw, origins, space, space_origin = {}, {}, None, None
    for table, origin in sweep_layers(pipeline, sweep_file):
        table = dict(table)
        if "space" in table:
            from_set = origin.startswith("--set ")
            space = _merge_space(space, table.pop("space"), origin, origins, replace=not from_set)
            space_origin = space_origin if from_set and space_origin else origin
        build_section("sweep", table, origin, cls=SweepConfig)  # this source's own keys, named as its
        raw.update(table)
        origins.update({k: origin for k in table})
    where = sweep_file or pipeline.origin
    if not raw and space is None:
        raise SherlError(f"{where}: no [sweep] table; add [sweep] and [sweep.space] to the pipeline file, or "
                         f"give one with --sweep FILE")
    if not space:
        raise SherlError(f"{space_origin or where}: [sweep.space] is missing or empty; name the train settings to "
                         f"vary, for example lr = {{low = 1e-4, high = 1e-2, log = true}}")
    if sweep_dir is not None:
        raw["dir"], origins["dir"] = sweep_dir, "--sweep-dir"
    return Sweep(build_section("sweep", raw, where, cls=SweepConfig), space, space_origin, origins)


def resolve_metric(cfg: SweepConfig, task_type: str, origin: str) -> tuple[str, str]:
    """(metric, direction): the configured ones, or the task's primary metric and its direction."""
    metric, direction = selection(task_type, cfg.metric, f"{origin}: sweep.metric")
    return metric, cfg.direction or direction
