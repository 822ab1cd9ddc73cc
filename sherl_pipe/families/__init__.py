"""Backbone families: one adapter per family, one file each (see base.py for the interface).

Every module of this package that defines `ADAPTER` registers its family under the adapter's
`model_type`, so adding a family is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from sherl_pipe.errors import SherlError
from sherl_pipe.families.base import Family, Shared, submodule


def _discover() -> dict[str, Family]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        adapter = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ADAPTER", None)
        if adapter is not None:
            found[adapter.model_type] = adapter
    return found


FAMILIES: dict[str, Family] = _discover()


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise SherlError(f"backbone model_type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "Shared", "family_of", "submodule"]
