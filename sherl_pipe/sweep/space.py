"""The search space: which train settings vary between trials, over which values.

[sweep.space] maps train keys to a list of values (categorical) or to {low, high, log} (a float or
int range). Everything is checked before any trial starts: the key must be a train setting a trial
may vary (a shared one or a method's own; not another section's: that would need another cache),
every value must be valid for it, and the cache must serve every combination of the methods'
own settings swept (SHERL's late_layers with every tiers list: their anchors and tiers stored).
"""

from __future__ import annotations

import itertools
import typing

from sherl_pipe.engine import Param, encode
from sherl_pipe.config import Pipeline, TrainConfig, build_section, laid_over, section_to_dict, train_keys
from sherl_pipe.errors import SherlError
from sherl_pipe.fields import as_written
from sherl_pipe.methods import get_method, option_owners
from sherl_pipe.methods.spec import make_spec

SHORT_RANGE = 16  # an int range this long or shorter is checked value by value against the cache

# train settings that say where or how a trial runs, not what it trains
FIXED = {"run_dir": "each trial has its own run folder in the sweep folder",
         "eval_split": "the sweep's metric is measured on it",
         "threads": "the sweep sets each trial's threads", "device": "the sweep's workers decide it",
         "preload": "set it in the pipeline", "save_every": "set it in the pipeline",
         "save_minutes": "set it in the pipeline", "log_every": "set it in the pipeline",
         "storage_options": "set it in the pipeline"}


def _train_field_type(key: str):
    """A train key's type: a shared setting's, or that of the first method whose options have it."""
    owners = option_owners()
    cls = get_method(owners[key][0]).Options if key in owners else TrainConfig
    return typing.get_type_hints(cls)[key]


def parse_param(key: str, spec, origin: str) -> Param:
    where = f"{origin}: sweep.space.{key}"
    fields = set(train_keys())
    if key not in fields:
        raise SherlError(f"{where}: not a train setting (known: {', '.join(sorted(fields - set(FIXED)))}); only "
                         f"train settings vary between trials: anything else would need another cache")
    if key in FIXED:
        raise SherlError(f"{where}: a trial cannot vary train.{key} ({FIXED[key]})")
    if isinstance(spec, list):
        if not spec:
            raise SherlError(f"{where}: an empty list; give the values to try")
        return Param(key, "categorical", tuple(tuple(v) if isinstance(v, list) else v for v in spec))
    if isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {"low", "high", "log"}:
        hint = _train_field_type(key)
        if hint not in (int, float):
            raise SherlError(f"{where}: a range needs a numeric setting; give a list of values")
        low, high, log = spec["low"], spec["high"], spec.get("log", False)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SherlError(f"{where}: low and high must be numbers with low <= high")
        if hint is int and not (float(low).is_integer() and float(high).is_integer()):
            raise SherlError(f"{where}: train.{key} is an integer; give integer bounds")
        if log and low <= 0:
            raise SherlError(f"{where}: a log range needs low > 0")
        return Param(key, "int" if hint is int else "float", (), float(low), float(high), bool(log))
    raise SherlError(f"{where}: give a list of values, or {{low = ..., high = ..., log = true|false}}")


def parse_space(raw: dict, where) -> list[Param]:
    """The space's parameters; WHERE is the source of every key (a string), or a function of
    "space.KEY" giving each key's source (sweep.config.Sweep.where)."""
    origin_of = where if callable(where) else (lambda key: where)
    if "train" in raw and isinstance(raw["train"], dict):  # train.lr = ... written as a dotted key
        raw = {**{k: v for k, v in raw.items() if k != "train"}, **raw["train"]}
    for key, value in raw.items():
        if isinstance(value, dict) and not {"low", "high"} & set(value):
            raise SherlError(f"{origin_of('space.' + key)}: sweep.space.{key}: only train settings vary between "
                             f"trials ({key}.* would need another cache)")
    return [parse_param(key, spec, origin_of(f"space.{key}")) for key, spec in raw.items()]


def values_to_check(p: Param) -> list:
    if p.kind == "categorical":
        return list(p.choices)
    if p.kind == "int":
        return sorted({int(p.low), int(p.high)})
    return [p.low, p.high]


def check_space(params: list[Param], pipeline: Pipeline, manifest: dict, where) -> None:
    """Every value valid for its setting, and every combination of the swept method and methods'
    own settings served by the cache. WHERE: as for parse_space."""
    origin_of = where if callable(where) else (lambda key: where)
    origin = origin_of("space")
    # the pipeline's method settings as given, each swept value laid over them as a trial's is (a
    # swept preset then sets the keys the pipeline leaves unset, as in the trial)
    base = section_to_dict(pipeline.train, given=True)
    for p in params:
        for v in values_to_check(p):
            try:
                build_section("train", laid_over(base, {p.key: list(v) if isinstance(v, tuple) else v}), "sweep")
            except SherlError as exc:
                raise SherlError(f"{origin_of('space.' + p.key)}: sweep.space.{p.key} = {v!r}: "
                                 f"{str(exc).split(': ', 1)[-1]}") from None
    served = [p for p in params if p.key == "method" or p.key in option_owners()]
    # the method settings the pipeline gives and the space does not vary: named beside the swept ones
    given = {**pipeline.train.flat, **pipeline.train.tables.get(pipeline.train.method, {})}
    fixed = [f"train.{k} = {as_written(v)} (not swept)" for k, v in given.items() if k not in {p.key for p in params}]
    for values in itertools.product(*(_candidates(p) for p in served)):
        swept = {p.key: as_written(v) for p, v in zip(served, values)}
        try:
            make_spec(build_section("train", laid_over(base, swept), "sweep"), manifest)
        except SherlError as exc:
            shown = " with ".join(fixed + [f"{k} = {v}" for k, v in swept.items()] +
                                  ([] if fixed else ["the pipeline's other train settings"]))
            raise SherlError(f"{origin}: sweep.space: {shown}: the cache cannot serve it "
                             f"({str(exc).split('sweep: ', 1)[-1]})") from None


def _candidates(p: Param) -> list:
    """The values a cache check tries: every choice, every integer of a short int range (a long
    one's ends: a setting with many values, a rank or a width, decides no tier), a float range's ends."""
    if p.kind == "categorical":
        return list(p.choices)
    if p.kind == "int" and p.high - p.low < SHORT_RANGE:
        return list(range(int(p.low), int(p.high) + 1))
    return [p.low, p.high]


def grid(params: list[Param], origin: str) -> dict[str, list]:
    """The grid sampler's search space: every parameter must be a list of values."""
    ranges = [p.key for p in params if p.kind != "categorical"]
    if ranges:
        raise SherlError(f"{origin}: sweep.sampler = 'grid' needs lists of values; sweep.space.{ranges[0]} is a "
                         f"range (use the random or tpe sampler, or list the values)")
    return {p.key: [encode(c) for c in p.choices] for p in params}


def grid_size(params: list[Param]) -> int:
    size = 1
    for p in params:
        size *= len(p.choices)
    return size
