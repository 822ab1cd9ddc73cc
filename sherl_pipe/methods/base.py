"""The method interface: what every training method declares, and the defaults most share.

A method's model takes a `Batch` (training/batches.py) and returns the head's outputs:
`model.forward_batch(batch)`. Cached methods read `batch.states` (the tiers `reads` names, from
the cache or, with train.source = "live", from the early layers run on the fly); fine-tuning
methods read `batch.input_ids` and run the backbone themselves. Parameters are "new" (trained at
the method's rate, train.lr, without weight decay by default) by membership in the modules the
model lists in `new_modules()` (and LoRA's adapters, by type), never by their names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import torch
from torch import nn

from sherl_pipe.backbone import empty_module
from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of
from sherl_pipe.fields import as_written, at_least, build, checked
from sherl_pipe.model import pool
from sherl_pipe.redundancy import barlow_twins, distorted
from sherl_pipe.splits import UNLABELED

PRETRAIN = "pretrain"  # the phase train.pretrain_epochs adds before the task's


@dataclass(frozen=True)
class Options:
    """A method's own settings: a frozen dataclass of fields made with sherl_pipe.fields, written
    as keys of [train] (shared with every method that has a key of that name) or in the method's
    own [train.<name>] table. This one has none; a method with settings subclasses it."""

    def to_saved(self) -> dict:
        """As a run's model.json and config.json write them: one flat key each."""
        return {f.name: as_written(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_saved(cls, saved: dict) -> "Options":
        """From a saved model.json (which also holds the shared spec fields, and in runs saved
        before methods owned their settings every method's keys): the keys this class has."""
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: checked(saved[f.name], f, hints[f.name], f"model.json: {f.name}")
                      for f in dataclasses.fields(cls) if f.name in saved})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        """The values a preset among the keys GIVEN sets for the keys not given (none here; SHERL's
        train.preset): what the options, and the section as written, take for those keys. A preset
        that is not one is ignored here (build refuses it)."""
        return {}


@dataclass(frozen=True)
class Phase:
    """A stretch of a run with an objective of its own (for example a policy's search, then
    fine-tuning; or self-supervised warm-up, then the task): EPOCHS epochs over the cached SPLIT;
    SUPERVISED: the task's loss is in its objective, and its epochs are evaluated (only they can be
    the best epoch or stop the run early). A run's phases follow each other; each resumes like an
    epoch (the loop's position says which phase it is in)."""

    name: str
    epochs: int
    split: str = "train"
    supervised: bool = True


@dataclass(frozen=True)
class WidthOptions(Options):
    """A method whose new modules run at width D / r."""

    reduction: int = at_least(0, 0)  # r; 0: the method's own (Method.reduction)


class Method:
    name = ""
    Options: type[Options] = Options  # its own settings
    sources: tuple[str, ...] = ("cached", "live")  # where its activations may come from
    whole_backbone = False  # it trains the whole backbone, loaded by stage two (else: only what `loads` names)
    lr = 1e-3  # train.lr = 0: the rate of its new modules and head
    reduction = 8  # its options' reduction = 0: the width D / r of its modules, where it has any
    # operating points beyond its defaults (its options' preset): `compare` shows each as a row of
    # its own by default (METHOD:preset=NAME)
    presets: tuple[str, ...] = ()
    # the methods table (README, docs/methods.md): what it trains, what it reads and loads, where it comes from
    trains = ""
    source_text = ""

    # --- its settings -------------------------------------------------------------------------
    def options(self, flat: dict, table: dict, where: str) -> Options:
        """Its settings from a train section: the [train] keys its Options has, under the keys of
        its own [train.<name>] table. WHERE names the section in a message."""
        own = self.Options.keys()
        mine = {k: v for k, v in flat.items() if k in own}
        build(self.Options, mine, where)  # a [train] key's fault named as it was written
        given = {**mine, **table}  # a key given wins over what a preset among them sets
        return build(self.Options, {**self.Options.preset_values(given), **given}, f"{where}.{self.name}",
                     ", ".join(own) or "none (it has none)")

    def spec_options(self, options: Options, manifest: dict) -> Options:
        """Its options for a model on a cache with this manifest, resolved and checked against it
        (a tier the cache lacks is refused with the extract setting that would store it).
        Default: it reads h[L]; a reduction of 0 becomes the method's own."""
        num_layers = manifest["backbone"]["num_layers"]
        require_tiers(manifest, [num_layers], self.name)
        return self.resolved_width(options)

    def resolved_width(self, options: Options) -> Options:
        if isinstance(options, WidthOptions) and not options.reduction:
            return dataclasses.replace(options, reduction=self.reduction)
        return options

    def reads(self, spec) -> list[int]:
        """The tiers it reads (from the cache, or from the early layers run live)."""
        return [spec.num_layers]

    def asks(self, options: Options, num_layers: int) -> str:
        """What it reads from a cache, in the words of the settings that choose it (a message's)."""
        return f"train.method = {self.name!r} (the last tier h[{num_layers}])"

    def loads(self, spec, family) -> list[str]:
        """The pretrained modules stage two loads for it (verified against the manifest's hashes):
        the modules a pre-LN family's final norm needs, and the pooler for cls-pooler pooling."""
        return [s.name for s in family.shared] + (["pooler"] if spec.pooling == "cls-pooler" else [])

    def lr_pretrained(self, spec, cfg) -> float:
        """train.lr_late = 0: the rate of the pretrained weights it trains (none by default)."""
        return 0.0

    # --- what it adds to the trainer (none by default) ----------------------------------------
    def phases(self, spec, cfg) -> list[Phase]:
        """Its run's phases, in order (CFG: the train section). Default: the task on train.epochs,
        after train.pretrain_epochs of self-supervised warm-up on the 'unlabeled' split if asked."""
        task = Phase("train", cfg.epochs)
        if not cfg.pretrain_epochs:
            return [task]
        if type(self).features is Method.features:
            raise SherlError(f"train.pretrain_epochs = {cfg.pretrain_epochs}: method {self.name!r} has no features "
                             f"to warm up (a self-supervised phase trains the modules below its head); set "
                             f"train.pretrain_epochs = 0, or use a method that has (sherl, unipt, lst)")
        return [Phase(PRETRAIN, cfg.pretrain_epochs, split=UNLABELED, supervised=False), task]

    def features(self, model: nn.Module, batch) -> torch.Tensor:
        """An (N, D) embedding of BATCH through the modules it trains below its head: what the
        warm-up's Barlow Twins compares between two distorted views. A method without one cannot
        warm up (train.pretrain_epochs is refused)."""
        raise NotImplementedError

    def enter_phase(self, model: nn.Module, phase: Phase) -> None:
        """Called as each phase starts, and again when a run resumes inside it: so it must leave the
        model as one call would (what it changes lives in the model's state, which a checkpoint keeps)."""

    def losses(self, model: nn.Module, batch, outputs, phase: Phase) -> dict:
        """Loss terms beside the task's on a training batch: {name: (weight, value)}, value a scalar
        tensor. The loop minimises the task's loss (in a supervised phase) + the sum of weight x
        value, and logs each value's epoch mean (metrics.jsonl's epoch records, summary.json, info).
        OUTPUTS: the model's outputs on the batch (None in a phase without the task). Default: in
        the warm-up phase, Barlow Twins between two distorted views of its features."""
        if phase.name != PRETRAIN:
            return {}
        return {"barlow": (1.0, barlow_twins(*(self.features(model, distorted(batch)) for _ in range(2))))}

    def parameter_groups(self, model: nn.Module, spec, cfg) -> list[dict]:
        """Parameters trained at rates of its own (a policy network's): [{"name", "params", "lr",
        "weight_decay"}], taken before the usual groups (new modules at train.lr, pretrained weights
        at train.lr_late), which then leave them out."""
        return []

    def for_inference(self, model: nn.Module) -> None:
        """Called on a trained model loaded to predict or evaluate (never in training): what the
        method does to it first (SWR merges its reparametrization into the weights). Default: nothing."""

    def report(self, model: nn.Module) -> dict | None:
        """What a finished run's summary.json records of the model beyond the shared fields (SWR:
        the units its policy chose); None: nothing."""
        return None

    def report_lines(self, report: dict | None) -> list[str]:
        """`info`'s lines for REPORT (as report() made it)."""
        return []

    # --- its model ----------------------------------------------------------------------------
    Model: type[nn.Module] | None = None  # its model's class, built as Model(spec, config, modules) ...

    def build(self, spec, config, modules: dict[str, nn.Module]) -> nn.Module:
        """... unless the method builds its model itself."""
        return self.Model(spec, config, modules)

    def empty_modules(self, spec, config) -> dict[str, nn.Module]:
        """Its pretrained modules built from the config alone (a checkpoint is loaded into them)."""
        family = family_of(config.model_type)
        return {name: empty_module(config, family, name)[0] for name in self.loads(spec, family)}

    def new_parameters(self, model: nn.Module) -> set[int]:
        """ids of the parameters of its new modules (and of LoRA adapters injected anywhere)."""
        ids = {id(p) for m in model.new_modules() for p in m.parameters()}
        return ids | lora_parameters(model)

    def summary(self, spec) -> str:
        """What `info RUN` says of the model after its method's name."""
        return f"reads tiers {self.reads(spec)}" if self.reads(spec) else "runs the whole backbone"

    # --- what the trainer and `info` ask of its model -----------------------------------------
    def consolidation(self, model: nn.Module) -> nn.Module | None:
        """The module whose tier weights a run measures and `info` shows (SHERL's consolidation);
        None for a method without one."""
        return None

    def compile(self, model: nn.Module, log) -> bool:
        """train.compile: compile what the method compiles (False: it has nothing to compile)."""
        return False

    def describe(self) -> dict:
        return {"method": self.name, "sources": list(self.sources), "lr": self.lr, "trains": self.trains,
                "from": self.source_text}


class EveryTier(Method):
    """A method that reads every tier h[0..L]: a cache extracted with extract.late_layers = 0."""

    def spec_options(self, options: Options, manifest: dict) -> Options:
        require_tiers(manifest, list(range(manifest["backbone"]["num_layers"] + 1)), self.name)
        return self.resolved_width(options)

    def reads(self, spec) -> list[int]:
        return list(range(spec.num_layers + 1))

    def asks(self, options: Options, num_layers: int) -> str:
        return f"train.method = {self.name!r} (every tier h[0..{num_layers}])"


class WidthEveryTier(EveryTier):
    """A method that reads every tier and trains modules of its own at width D / r (UniPT, LST)."""

    Options = WidthOptions  # reduction r, written as a [train] key or in the method's [train.<name>] table

    def features(self, model: nn.Module, batch) -> torch.Tensor:
        """Its modules' output (the model's hidden(batch)) pooled over the real tokens: what a
        warm-up trains."""
        return pool(model.hidden(batch), batch.mask, "mean", None)


def every_tier(batch, num_layers: int) -> list:
    """h[0..L] of a batch in fp32, padding zeroed (selected away, never multiplied: inf * 0 = NaN)."""
    keep = batch.mask.bool().unsqueeze(-1)
    return [batch.states[i].float().masked_fill(~keep, 0.0) for i in range(num_layers + 1)]


def require_tiers(manifest: dict, tiers: list[int], method: str) -> None:
    """Refuse, before training, a tier the cache does not store, naming the extract setting."""
    stored = set(manifest["tiers"])
    missing = [t for t in tiers if t not in stored]
    if missing:
        num_layers = manifest["backbone"]["num_layers"]
        last = missing[-1]
        fix = (f"extract.late_layers = {num_layers - last}" if last > max(stored) else
               f"extract.tiers to include {last} (or leave it empty)")
        raise SherlError(f"train.method = '{method}' reads tier h[{last}], which the cache does not store "
                         f"(stored: {sorted(stored)}); extract the cache with {fix}")


def lora_parameters(model: nn.Module) -> set[int]:
    """ids of LoRA adapters' parameters (peft's lora_A / lora_B modules), found by type."""
    from peft.tuners.lora import LoraLayer  # peft is heavy: imported when parameters are grouped, not with the method

    out = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapters in (module.lora_A, module.lora_B):
                out |= {id(p) for p in adapters.parameters()}
    return out


def frozen(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.requires_grad_(False)
    return module
