"""A compare row of a method with settings of its own: METHOD:key=value[:key=value...], for example
`--methods sherl,sherl:late_tuning=swr,sherl:redundancy=barlow` compares SHERL's defaults with
two of its options in one table, against one set of full fine-tuning runs (and, at --budget time,
one budget). A row's name is its label as written; its trials train METHOD with the keys set as a
`--set train.key=value` would (the last word over the pipeline's [train] and its method tables).
"""

from __future__ import annotations

import dataclasses
import tomllib

from sherl_pipe.config import Pipeline, TrainConfig, apply_overrides, laid_over
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import get_method

SEP = ":"
# what compare sets for each trial (or the pipeline for all): a row cannot set them
SET_BY_COMPARE = ("method", "mode", "seed", "epochs", "lr", "lr_late", "run_dir", "eval_split", "metric",
                  "max_seconds", "threads")


def split(label: str) -> tuple[str, list[tuple[str, str]]]:
    """(method, [(key, value as written)]) of a row's label."""
    method, *sets = label.split(SEP)
    pairs = []
    for item in sets:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise SherlError(f"--methods {label!r}: expected METHOD:key=value[:key=value...], for example "
                             f"sherl:late_tuning=swr")
        pairs.append((key, value))
    return method.strip(), pairs


def default_rows(names: list[str]) -> list[str]:
    """What compare runs when no methods are named: each method of NAMES at its defaults, then a
    row for each preset it offers beyond them (sherl, sherl:preset=accuracy)."""
    return [row for name in names for row in (name, *(f"{name}{SEP}preset={p}" for p in get_method(name).presets))]


def method_of(label: str) -> str:
    return split(label)[0]


def check_label(label: str) -> None:
    """Refuse, in one line naming the row, a key compare sets itself or that its method lacks."""
    method, sets = split(label)
    plugin = get_method(method, f"--methods {label!r}: method")
    shared = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("method_settings")]
    for key, _ in sets:
        if key in SET_BY_COMPARE:
            raise SherlError(f"--methods {label!r}: train.{key} is set by compare for every row (seeds, epochs "
                             f"and rates: --seeds, --budget, --tune-lr); leave it out of the row")
        if key not in shared and key not in plugin.Options.keys():
            raise SherlError(f"--methods {label!r}: method {method!r} has no setting {key!r} (its own: "
                             f"{', '.join(plugin.Options.keys()) or 'none'}; or a shared key of [train])")


def variant_pipeline(pipeline: Pipeline, label: str) -> Pipeline:
    """PIPELINE training the row LABEL: its method, its keys set last."""
    check_label(label)
    method, sets = split(label)
    out = pipeline.with_overrides("train", method=method)
    try:
        return apply_overrides(out, [f"train.{k}={v}" for k, v in sets])
    except SherlError as exc:
        raise SherlError(f"--methods {label!r}: {exc}") from None


def variant_train(train: dict) -> dict:
    """A trial's [train] (as a dict, its method the row's label) with the row's method and keys:
    what the trial's job trains (the label was checked when the comparison was planned)."""
    method, sets = split(train["method"])
    if not sets:
        return train
    values = {key: toml_value(text) for key, text in sets}
    return laid_over({**train, "method": method}, values)


def toml_value(text: str):
    """A TOML value (number, bool, array, quoted string), or else the bare string (as --set reads it)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
