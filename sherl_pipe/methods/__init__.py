"""Training methods as plug-ins, registered by name (train.method).

Each method is one module of this package with one `Method` subclass (base.py): the tiers it
reads from the cache, the pretrained modules it loads, the model it builds, which parameters are
new (trained at its own rate), and its defaults. The trainer, the batch sampler, checkpoints,
resume, evaluation, predict, sweeps, compare and `info` ask the method; nothing else branches on
its name. A new method is its module plus one line in REGISTRY (or `register_method` from code,
as a test registers a toy method).

The registry holds import paths, so `import sherl_pipe.methods` loads no torch.
"""

from __future__ import annotations

import importlib

from sherl_pipe.errors import SherlError

# name -> "module:class"; the order is the methods table's (README, docs/methods.md) and compare's
REGISTRY: dict[str, object] = {
    "sherl": "sherl_pipe.methods.sherl:Sherl",
    "unipt": "sherl_pipe.methods.unipt:UniPT",
    "lst": "sherl_pipe.methods.lst:LST",
    "linear-probe": "sherl_pipe.methods.linear_probe:LinearProbe",
    "scalar-mix": "sherl_pipe.methods.scalar_mix:ScalarMix",
    "swr": "sherl_pipe.methods.swr:Swr",
    "lora-finetune": "sherl_pipe.methods.finetune:LoraFinetune",
    "full-finetune": "sherl_pipe.methods.finetune:FullFinetune",
}


BUILTIN = dict(REGISTRY)  # the package's own: what a fresh process (a worker, a compare job) knows
DEFAULT = "sherl"  # train.method when a pipeline names none
REFERENCE = "full-finetune"  # what compare measures the others against (its time budget, its intervals)
# train.mode as it was before methods existed: (train.method, train.source)
LEGACY_MODES = {"cached": ("sherl", "cached"), "live": ("sherl", "live"), "full-finetune": ("full-finetune", "live")}


def method_names() -> list[str]:
    return list(REGISTRY)


def register_method(name: str, cls) -> None:
    """Add (or replace) a method by name: a `Method` subclass, or "module:class"."""
    REGISTRY[name] = cls


def get_method(name: str, key: str = "train.method"):
    """The method registered as NAME (an instance), or one line naming the known ones."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise SherlError(f"{key} = {name!r} is not a method; known: {', '.join(REGISTRY)}")
    if isinstance(entry, str):
        try:
            entry = resolve(entry)
        except (ImportError, AttributeError) as exc:
            raise SherlError(f"{key} = {name!r} is registered as {entry!r}, which cannot be imported here ({exc}); "
                             f"register a class importable from the Python path") from None
    return entry()


def resolve(reference: str):
    """The object "module:Name" names (Name may be dotted: a class nested in another, Outer.Inner)."""
    module, _, name = reference.partition(":")
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


def registered_from_code() -> dict:
    """Methods registered in this process beyond the package's own (register_method, as a class or
    "module:Class"): a worker or a compare job knows only BUILTIN, so they travel with each trial."""
    return {name: entry for name, entry in REGISTRY.items() if BUILTIN.get(name) is not entry}


def effective_train(train: dict) -> dict:
    """A train section (as a dict) with the settings whose 0 means "the method's default" resolved,
    so that runs and sweeps saved when those defaults were written out (reduction 8 before it
    became 0) compare equal to today's."""
    if not train.get("reduction") and train.get("method", DEFAULT) in REGISTRY:
        return {**train, "reduction": get_method(train.get("method", DEFAULT)).reduction}
    return train


# --- the methods' own settings in a train section --------------------------------------------
# A method's options (its Options) are written as keys of [train], each applying to every method
# that has a key of that name (`reduction` to sherl, unipt and lst alike; compare runs every
# method on one pipeline), or in a [train.<method>] table, that method's alone and over the keys.

def option_owners(names=None) -> dict[str, list[str]]:
    """key -> the methods (of NAMES, default every registered one) whose options have it."""
    owners: dict[str, list[str]] = {}
    for name in names or REGISTRY:
        for key in get_method(name).Options.keys():
            owners.setdefault(key, []).append(name)
    return owners


def check_settings(flat: dict, tables: dict, where: str) -> None:
    """Every key of [train] that is no shared setting belongs to some method and is valid for each
    that has it; every [train.<method>] table names a method and holds its keys, valid. WHERE
    names the section ("FILE: train")."""
    owners = option_owners()
    for key, value in flat.items():
        for name in owners[key]:
            get_method(name).options({key: value}, {}, where)
    for name, table in tables.items():
        get_method(name).options({}, table, where)


def settings_as_written(flat: dict, tables: dict) -> dict:
    """A train section's method keys as it is written, printed and compared: every key of the
    package's own methods (given, or its default: the first such method's, under the preset the
    section sets for it, so a section written by an earlier sherl-pipe, when these were fields of
    [train], compares equal), any other key given, then the tables given."""
    out = {}
    for key, names in option_owners(list(BUILTIN)).items():
        options = get_method(names[0]).Options
        # a preset's values where the section sets one (read back, they give the same options)
        preset = options.preset_values({**flat, **tables.get(names[0], {})})
        out[key] = flat.get(key, preset.get(key, getattr(options(), key)))
    out.update(flat)
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
    return {**out, **{name: dict(table) for name, table in tables.items()}}
