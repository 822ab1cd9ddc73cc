"""A trial parameter: a train key and the values a study may give it (the search space's unit, and
a comparison's fixed trial settings as categorical ones)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    key: str  # a train key
    kind: str  # categorical | float | int
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def suggest(self, trial):
        """This parameter's value for an Optuna trial (lists travel as JSON strings: Optuna's
        categorical values are scalars)."""
        if self.kind == "categorical":
            return decode(trial.suggest_categorical(self.key, [encode(c) for c in self.choices]))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def encode(value):
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else value


def decode(value):
    return tuple(json.loads(value)) if isinstance(value, str) and value.startswith("[") else value
