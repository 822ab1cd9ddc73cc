"""The method interface: what every training method declares, and the defaults most share.

A method's model takes a `Batch` (training/batches.py) and returns the head's outputs:
`model.forward_batch(batch)`. Cached methods read `batch.states` (the tiers `reads` names, from
the cache or, with train.source = "live", from the early layers run on the fly); fine-tuning
methods read `batch.input_ids` and run the backbone themselves. Parameters are "new" (trained at
the method's rate, train.lr, without weight decay by default) by membership in the modules the
model lists in `new_modules()` (and LoRA's adapters, by type), never by their names.
"""

from __future__ import annotations

from torch import nn

from sherl_pipe.errors import SherlError


class Method:
    name = ""
    sources: tuple[str, ...] = ("cached", "live")  # where its activations may come from
    lr = 1e-3  # train.lr = 0: the rate of its new modules and head
    reduction = 8  # train.reduction = 0: the width D / r of its modules, where it has any
    # the methods table (README, docs/methods.md): what it trains, what it reads and loads, where it comes from
    trains = ""
    source_text = ""

    # --- what it reads from the cache and loads from the backbone ------------------------------
    def spec_fields(self, cfg, manifest: dict) -> dict:
        """ModelSpec fields of this method, checked against the cache's manifest (a tier the cache
        lacks is refused with the extract setting that would store it). Default: reads h[L]."""
        num_layers = manifest["backbone"]["num_layers"]
        require_tiers(manifest, [num_layers], self.name)
        return {"late_layers": 0, "tiers": (), "late_tuning": "frozen"}

    def reads(self, spec) -> list[int]:
        """The tiers it reads (from the cache, or from the early layers run live)."""
        return [spec.num_layers]

    def loads(self, spec, family) -> list[str]:
        """The pretrained modules stage two loads for it (verified against the manifest's hashes):
        the modules a pre-LN family's final norm needs, and the pooler for cls-pooler pooling."""
        return [s.name for s in family.shared] + (["pooler"] if spec.pooling == "cls-pooler" else [])

    def lr_pretrained(self, spec, cfg) -> float:
        """train.lr_late = 0: the rate of the pretrained weights it trains (none by default)."""
        return 0.0

    # --- its model ----------------------------------------------------------------------------
    def build(self, spec, config, modules: dict[str, nn.Module]) -> nn.Module:
        raise NotImplementedError

    def empty_modules(self, spec, config) -> dict[str, nn.Module]:
        """Its pretrained modules built from the config alone (a checkpoint is loaded into them)."""
        from sherl_pipe.backbone import empty_module
        from sherl_pipe.families import family_of

        family = family_of(config.model_type)
        return {name: empty_module(config, family, name)[0] for name in self.loads(spec, family)}

    def new_parameters(self, model: nn.Module) -> set[int]:
        """ids of the parameters of its new modules (and of LoRA adapters injected anywhere)."""
        ids = {id(p) for m in model.new_modules() for p in m.parameters()}
        return ids | lora_parameters(model)

    def summary(self, spec) -> str:
        """What `info RUN` says of the model after its method's name."""
        return f"reads tiers {self.reads(spec)}" if self.reads(spec) else "runs the whole backbone"

    def describe(self) -> dict:
        return {"method": self.name, "sources": list(self.sources), "lr": self.lr, "trains": self.trains,
                "from": self.source_text}


class EveryTier(Method):
    """A method that reads every tier h[0..L]: a cache extracted with extract.late_layers = 0."""

    def spec_fields(self, cfg, manifest: dict) -> dict:
        require_tiers(manifest, list(range(manifest["backbone"]["num_layers"] + 1)), self.name)
        return {"late_layers": 0, "tiers": (), "late_tuning": "frozen"}

    def reads(self, spec) -> list[int]:
        return list(range(spec.num_layers + 1))


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
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return set()
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
