"""SHERL (Diao et al., ECCV 2024): the early route's tiers consolidated by the anti-redundancy
module (consolidation.py), then the last k pretrained layers, pooling and the head.

Reads the tiers h[t] below the anchor h[L-k] and the anchor (its options' tiers and late_layers);
loads the late layers (and the pooler for cls-pooler, and the family's shared modules); trains the
consolidation and the head, and the late layers as its late_tuning says. Its options (SherlOptions)
are written as [train] keys or in a [train.sherl] table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from sherl_pipe.compiled import CompiledOrEager
from sherl_pipe.consolidation import (ANCHOR_RESIDUALS, DEFAULT_TIER_SCORE, PAPER_ANCHOR_RESIDUAL, PAPER_TIER_SCORE,
                                      TIER_SCORES, Consolidation)
from sherl_pipe.dropout import use_fast_dropout
from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of
from sherl_pipe.fields import at_least, choice
from sherl_pipe.methods.base import Method, WidthOptions, lora_parameters
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.methods.swr import (SWR_LR, SwrOptions, enter_swr_phase, policy_group, reparametrize, report_lines,
                                    swr_losses, swr_phases)
from sherl_pipe.model import Head, norm_and_bias_parameters, pool
from sherl_pipe.redundancy import barlow_twins, distorted

LATE_LR = {"frozen": 0.0, "norm-bias": 5e-4, "lora": 3e-4, "full": 3e-5, "swr": SWR_LR}  # train.lr_late = 0

# train.preset: SHERL's two operating points, the keys each sets where the pipeline does not set
# them. memory: the paper's recipe on the last 2 layers (the defaults: the least memory). accuracy:
# the open start with the last two thirds of the layers fully trained (late_layers = 0). On
# MiniLM (4 of 6 layers) that scored within 0.5 points of full fine-tuning at equal time on SST-2,
# the tweets and the reviews at 0.58-0.72x its peak memory (docs/methods.md, SHERL's presets); the
# share of the depth is carried over to other depths unmeasured.
DEFAULT_PRESET = "memory"
PRESETS = {DEFAULT_PRESET: {}, "accuracy": {"late_layers": 0, "late_tuning": "full", "anchor_residual": "open"}}
OTHER_PRESETS = tuple(p for p in PRESETS if p != DEFAULT_PRESET)
DEPTH_SHARE = 2 / 3  # late_layers = 0: this share of the backbone's layers


def late_layers_for(options, num_layers: int) -> int:
    """k for a backbone of NUM_LAYERS: late_layers, or for 0 two thirds of the layers, rounded
    (4 of 6, 8 of 12), keeping at least one layer in the late route and one early."""
    if options.late_layers:
        return options.late_layers
    return max(1, min(num_layers - 1, round(DEPTH_SHARE * num_layers)))


@dataclass(frozen=True)
class SherlOptions(WidthOptions, SwrOptions):
    """SHERL's settings: [train] keys, or a [train.sherl] table (SwrOptions' for late_tuning = "swr")."""

    # an operating point (PRESETS): the values of late_layers, late_tuning and anchor_residual the
    # pipeline does not set itself
    preset: str = choice(DEFAULT_PRESET, *OTHER_PRESETS)
    # k: the last k pretrained layers form the late route (docs/results/2026-11-24-defaults.md);
    # 0: two thirds of the backbone's layers (late_layers_for)
    late_layers: int = at_least(2, 0)
    tiers: tuple[int, ...] = ()  # the consolidation's inputs; empty: every cached tier below the anchor
    # which late-layer weights train (swr: the units a policy chooses under swr_budget, methods/swr.py)
    late_tuning: str = choice("frozen", "norm-bias", "lora", "full", "swr")
    projection: str = choice("gated-mlp", "linear-ln")  # the per-tier projection (consolidation.PROJECTIONS)
    # how tier scores become weights (consolidation.TIER_SCORES; relu, the paper's, left most runs'
    # tiers unused: docs/methods.md, The consolidation's tier score)
    tier_score: str = choice(DEFAULT_TIER_SCORE, *(s for s in TIER_SCORES if s != DEFAULT_TIER_SCORE))
    # how the module starts (consolidation.ANCHOR_RESIDUALS): shut, the paper's, its output replaces
    # h[L-k]; open, h[L-k] passed on and the module's own output at zero (docs/methods.md)
    anchor_residual: str = choice(PAPER_ANCHOR_RESIDUAL, *(a for a in ANCHOR_RESIDUALS if a != PAPER_ANCHOR_RESIDUAL))
    lora_rank: int = at_least(8, 1)  # late_tuning = "lora"
    lora_alpha: float = at_least(16.0, 0.0)
    # barlow: Barlow Twins on two views of the consolidation's output (redundancy.py), a loss term
    # of weight redundancy_weight beside the task's
    redundancy: str = choice("none", "barlow")
    redundancy_weight: float = at_least(0.1, 0.0)

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        preset = PRESETS.get(given.get("preset", DEFAULT_PRESET), {})
        return {k: v for k, v in preset.items() if k not in given}

    def to_saved(self) -> dict:
        d = super().to_saved()
        if d["preset"] == DEFAULT_PRESET:  # as runs saved before presets wrote it
            del d["preset"]
        for key, paper in (("tier_score", PAPER_TIER_SCORE), ("anchor_residual", PAPER_ANCHOR_RESIDUAL)):
            if d[key] == paper:  # as runs saved before the option existed wrote it (their resume compares it)
                del d[key]
        if d["redundancy"] == "none":  # likewise: runs saved before it had no term
            del d["redundancy"], d["redundancy_weight"]
        if d["late_tuning"] != "swr":  # and before SWR
            for key in SwrOptions.keys():
                del d[key]
        return d

    @classmethod
    def from_saved(cls, saved: dict) -> "SherlOptions":
        # a run saved before tier_score existed trained with the paper's relu
        return super().from_saved({"tier_score": PAPER_TIER_SCORE, **saved})


class Sherl(Method):
    name = "sherl"
    Options = SherlOptions
    presets = OTHER_PRESETS
    trains = "consolidation of the early tiers + head; the last k layers as train.late_tuning says"
    source_text = "Diao et al., ECCV 2024 (the consolidation as the official code's MTSA)"

    def spec_options(self, options: SherlOptions, manifest: dict) -> SherlOptions:
        num_layers = manifest["backbone"]["num_layers"]
        k = late_layers_for(options, num_layers)
        options = dataclasses.replace(options, late_layers=k)
        anchor = num_layers - k
        stored = manifest["tiers"]
        if k >= num_layers:  # re-extracting cannot help: the backbone is too shallow
            fix = (f"set train.late_layers to at most {num_layers - 1}" if num_layers > 1 else
                   "SHERL needs a backbone of 2 layers or more")
            raise SherlError(f"train.late_layers = {k}: the backbone has {num_layers} layers and at "
                             f"least one must stay early (cached); {fix}")
        if anchor not in stored:
            raise SherlError(f"train.late_layers = {k}: its anchor h[{anchor}] is not in the cache "
                             f"(stored tiers {stored}); choose late_layers with L - k in the stored tiers, or "
                             f"extract the cache with extract.late_layers = {k}")
        tiers = list(options.tiers) if options.tiers else [t for t in stored if t < anchor]
        bad = [t for t in tiers if t not in stored or t > anchor]
        if bad:
            raise SherlError(f"train.tiers: tier {bad[0]} is not a stored tier at or below the anchor h[{anchor}] "
                             f"(stored: {stored})")
        return dataclasses.replace(self.resolved_width(options), tiers=tuple(sorted(set(tiers) - {anchor})))

    def reads(self, spec) -> list[int]:
        return list(spec.options.tiers) + [spec.anchor]

    def asks(self, options: SherlOptions, num_layers: int) -> str:
        tiers = f"tiers {list(options.tiers)}" if options.tiers else "the tiers below it"
        k = late_layers_for(options, num_layers)
        return f"train.late_layers = {k} (the anchor h[{num_layers - k}] and {tiers})"

    def loads(self, spec, family) -> list[str]:
        layers = [f"layer.{i}" for i in range(spec.anchor, spec.num_layers)]
        return layers + (["pooler"] if spec.pooling == "cls-pooler" else []) + [s.name for s in family.shared]

    def lr_pretrained(self, spec, cfg) -> float:
        return LATE_LR[spec.options.late_tuning]

    def summary(self, spec) -> str:
        o = spec.options
        return (f"preset {o.preset}: late layers {o.late_layers} ({o.late_tuning}), tiers {list(o.tiers)} + anchor "
                f"h[{spec.anchor}], tier score {o.tier_score}, {o.anchor_residual} start")

    def build(self, spec, config, modules: dict[str, nn.Module]) -> nn.Module:
        family = family_of(config.model_type)
        late = [modules[f"layer.{i}"] for i in range(spec.anchor, spec.num_layers)]
        return build_sherl_model(spec, config, late, modules.get("pooler"),
                                 {s.name: modules[s.name] for s in family.shared})

    def consolidation(self, model: nn.Module) -> nn.Module:
        return model.consolidation

    # --- late_tuning = "swr": SWR's phases, budget term, policy and merge on the late layers ---
    def phases(self, spec, cfg) -> list:
        phases = super().phases(spec, cfg)
        return swr_phases(phases, spec.options) if spec.options.late_tuning == "swr" else phases

    def enter_phase(self, model: nn.Module, phase) -> None:
        if model.reparam is not None:
            enter_swr_phase(model.reparam, phase)

    def parameter_groups(self, model: nn.Module, spec, cfg) -> list[dict]:
        return policy_group(model.reparam, spec.options) if model.reparam is not None else []

    def for_inference(self, model: nn.Module) -> None:
        model.merge()

    def report(self, model: nn.Module) -> dict | None:
        return model.reparam.report() if model.reparam is not None else None

    def report_lines(self, report: dict | None) -> list[str]:
        return report_lines(report)

    def losses(self, model: nn.Module, batch, outputs, phase) -> dict:
        """train.redundancy = "barlow": Barlow Twins between two views of the consolidation's output
        (each view: the cached tiers through input dropout and the consolidation's own dropout),
        pooled over the real tokens."""
        terms = super().losses(model, batch, outputs, phase)  # the warm-up's
        o = model.spec.options
        if model.reparam is not None:
            terms.update(swr_losses(model.reparam, o, phase))
        if o.redundancy == "none" or not phase.supervised:
            return terms
        views = [pool(model.consolidate(view.states, view.mask), view.mask, "mean", None)
                 for view in (distorted(batch), distorted(batch))]
        return {**terms, "barlow": (o.redundancy_weight, barlow_twins(*views))}

    def features(self, model: nn.Module, batch) -> torch.Tensor:
        """The late route's output h[L], pooled over the real tokens (the warm-up trains the
        consolidation, and the late layers as late_tuning says)."""
        hidden = model.late_route(model.consolidate(batch.states, batch.mask), batch.mask)
        return pool(hidden, batch.mask, "mean", None)

    def compile(self, model: nn.Module, log) -> bool:
        model.compile_consolidation(log)
        return True


class SherlModel(nn.Module):
    """Consolidation of the cached tiers, then the late layers, pooling and the head.

    `shared` holds the pretrained modules the late layers need beside themselves (see
    `sherl_pipe.families`); `helpers` the weightless ones built from the config (rotary tables)."""

    def __init__(self, spec: ModelSpec, config, late: list[nn.Module], pooler: nn.Module | None,
                 shared: dict[str, nn.Module] | None = None):
        super().__init__()
        self.spec = spec
        self.config = config
        self.family = family_of(config.model_type)
        self.consolidation = Consolidation(
            config.hidden_size, list(spec.options.tiers), spec.anchor, spec.options.reduction, spec.options.projection,
            post_ln=self.family.post_ln, dropout=spec.dropout, layer_norm_eps=self.family.layer_norm_eps(config),
            tier_score=spec.options.tier_score, anchor_residual=spec.options.anchor_residual)
        self.late = nn.ModuleList(late)
        self.shared = nn.ModuleDict(shared or {})
        self.helpers = nn.ModuleDict(self.family.helpers(config))
        self.pooler = pooler
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale, spec.head_norm)
        use_fast_dropout(self)  # the late layers' dropouts too (see dropout.py)
        self._compiled = None  # a CompiledOrEager of the consolidation, after compile_consolidation()
        self.reparam = None  # late_tuning = "swr": the late layers' Reparametrization

    def compile_consolidation(self, log) -> None:
        """train.compile: training steps call torch.compile(consolidation), falling back to eager.
        A plain attribute, not a submodule: the state dict keeps the consolidation's own names."""
        object.__setattr__(self, "_compiled", CompiledOrEager(self.consolidation, log, "consolidation"))

    def consolidate(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The consolidation's output, the late route's input: compiled in training steps if asked.
        Always in fp32, whatever autocast surrounds it: its tier weights divide relevance by
        redundancy, cosines between tiers that differ in the third digit, which bf16's 8-bit
        mantissa flattens (benchmarks/precision.py, SST-2, 8,000 rows, 3 seeds: bf16 with the
        consolidation in bf16 -0.84 points, with it in fp32 -0.11, at the same speed)."""
        with torch.autocast(mask.device.type, enabled=False):
            return (self._compiled or self.consolidation)(states, mask)

    def late_route(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The late layers (and a pre-LN family's final norm) on a (B, T, D) input: h[L]."""
        if self.reparam is not None:
            self.reparam.draw(self.training)
        modules = {**self.shared, **self.helpers}
        context = self.family.prepare(self.config, modules, hidden, mask)
        for i, layer in enumerate(self.late):
            hidden = self.family.run_layer(layer, hidden, context, self.spec.anchor + i, modules)
        return self.family.finish(hidden, modules)

    def forward(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        hidden = self.late_route(self.consolidate(states, mask), mask)
        return self.head(pool(hidden, mask, self.spec.pooling, self.pooler))

    def forward_batch(self, batch) -> torch.Tensor:
        return self(batch.states, batch.mask)

    def new_modules(self) -> list[nn.Module]:
        return [self.consolidation, self.head]

    def merge(self) -> None:
        """late_tuning = "swr": the chosen units merged into the late layers, the policy dropped."""
        if self.reparam is not None:
            self.reparam.merge()
            self.reparam = None


def apply_late_tuning(model: SherlModel) -> None:
    """Set which pretrained weights train; gradients always flow through the late layers."""
    mode = model.spec.options.late_tuning
    pretrained = [model.late, model.shared] + ([model.pooler] if model.pooler is not None else [])
    for module in pretrained:
        module.requires_grad_(mode == "full")
    if mode == "norm-bias":
        for module in pretrained:
            chosen = norm_and_bias_parameters(module, model.family.norm_types)
            for p in module.parameters():
                p.requires_grad_(id(p) in chosen)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # peft is heavy: imported when a model is built

        cfg = LoraConfig(r=model.spec.options.lora_rank, lora_alpha=model.spec.options.lora_alpha, lora_dropout=0.0,
                         target_modules=list(model.family.lora_targets))
        for i, layer in enumerate(model.late):
            model.late[i] = inject_adapter_in_model(cfg, layer)
        adapters = lora_parameters(model.late)
        for p in model.late.parameters():
            p.requires_grad_(id(p) in adapters)
    elif mode == "swr":
        model.reparam = reparametrize(list(model.late), model.spec.anchor, model.spec.num_layers, model.family,
                                      model.spec.options)


def build_sherl_model(spec: ModelSpec, config, late: list[nn.Module], pooler: nn.Module | None,
                      shared: dict[str, nn.Module] | None = None) -> SherlModel:
    model = SherlModel(spec, config, late, pooler if spec.pooling == "cls-pooler" else None, shared)
    apply_late_tuning(model)
    return model
