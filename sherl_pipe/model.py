"""Stage two's model: consolidation -> late layer(s) -> pooling -> head, and the full fine-tuning
reference that runs the whole backbone with the same pooling and head.

`ModelSpec` is everything needed to rebuild a trained model from a run folder: with the backbone
config stored in the cache manifest, no backbone folder is needed to evaluate a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sherl_pipe.consolidation import PAPER_TIER_SCORE, Consolidation
from sherl_pipe.dropout import use_fast_dropout
from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of

LATE_LR = {"frozen": 0.0, "norm-bias": 5e-4, "lora": 3e-4, "full": 3e-5}
NEW_LR = 1e-3
FULL_FT_LR = 3e-5


@dataclass(frozen=True)
class ModelSpec:
    mode: str  # cached | live | full-finetune
    task_type: str
    num_outputs: int
    num_layers: int
    late_layers: int
    tiers: tuple[int, ...]  # consolidation inputs other than the anchor
    pooling: str
    projection: str
    reduction: int
    dropout: float
    late_tuning: str
    lora_rank: int
    lora_alpha: float
    # Regression: the training targets' mean and sd. The head predicts in sd units around the mean
    # and the loss is the MSE in those units, so the defaults hold whatever the targets' scale (a
    # head starting near 0 took many epochs to reach targets around 19 and lost to the mean).
    # Classification, and runs saved before these existed: 0 and 1, no scaling.
    target_mean: float = 0.0
    target_std: float = 1.0
    # Regression: the head standardizes its pooled input (running averages, see Head).
    # False for classification and for runs saved before it existed (their state has no norm).
    head_norm: bool = False
    # How the consolidation weighs its tiers (consolidation.TIER_SCORES). Runs saved before it
    # existed used the paper's relu; to_dict omits it there, so their specs compare equal.
    tier_score: str = PAPER_TIER_SCORE

    @property
    def anchor(self) -> int:
        return self.num_layers - self.late_layers

    @property
    def target_scale(self) -> tuple[float, float] | None:
        return None if (self.target_mean, self.target_std) == (0.0, 1.0) else (self.target_mean, self.target_std)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tiers"] = list(self.tiers)
        if self.target_scale is None:  # as runs without target scaling saved it (their resume compares it)
            del d["target_mean"], d["target_std"]
        if not self.head_norm:
            del d["head_norm"]
        if self.tier_score == PAPER_TIER_SCORE:
            del d["tier_score"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{**d, "tiers": tuple(d["tiers"])})


def config_from_manifest(manifest: dict, attn_implementation: str | None = None):
    """The backbone's transformers config, rebuilt from the copy stored in the cache manifest."""
    from transformers import AutoConfig

    stored = dict(manifest["backbone"]["config"])
    family = family_of(stored["model_type"])
    config = AutoConfig.for_model(stored.pop("model_type"), **stored)
    config._attn_implementation = family.attention_for(attn_implementation or
                                                       manifest["backbone"]["attn_implementation"])
    return config


def resolve_pooling(requested: str, manifest: dict) -> str:
    """`auto`: what a sentence-transformers folder says, else the family's default: `cls-pooler`
    where the family and its weights have a pooler (BERT, RoBERTa, XLM-R, MPNet), otherwise `cls`
    (ModernBERT: its config's classifier_pooling). `cls-pooler` on a family without a pooler (or
    weights without one) is refused here."""
    config = config_from_manifest(manifest)
    family = family_of(config.model_type)
    in_weights = "pooler" in manifest["backbone"].get("module_hashes", {"pooler": ""})
    if requested == "auto":
        requested = manifest["backbone"].get("sentence_transformers_pooling") or family.default_pooling(config)
        return "cls" if requested == "cls-pooler" and not in_weights else requested
    if requested == "cls-pooler" and family.pooler_path is None:
        raise SherlError(f"train.pooling = 'cls-pooler': {config.model_type} backbones have no pooler; set "
                         f"train.pooling to 'cls' or 'mean' (or 'auto': {family.default_pooling(config)})")
    if requested == "cls-pooler" and not in_weights:
        raise SherlError("train.pooling = 'cls-pooler': the backbone's weights file has no pooler; set "
                         "train.pooling to 'cls' or 'mean'")
    return requested


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, pooler: nn.Module | None) -> torch.Tensor:
    if pooling == "mean":  # padding selected away, not multiplied by 0 (inf * 0 = NaN)
        keep = mask.bool().unsqueeze(-1)
        return hidden.masked_fill(~keep, 0.0).sum(1) / keep.sum(1).clamp_min(1).to(hidden.dtype)
    if pooling == "cls":
        return hidden[:, 0]
    if pooler is None:
        raise SherlError("pooling 'cls-pooler' needs the backbone's pooler, which its weights file lacks; "
                         "set train.pooling = 'cls' or 'mean'")
    return pooler(hidden)


NORM_EPS = 1e-5  # added to the regression head's running variance, as torch's norms do


class Head(nn.Module):
    """Dropout and a linear layer; for regression, its output mapped from sd units to the targets'
    units in float64 (a mean like 1,000 leaves float32 a resolution of 6e-5 of its units; bf16 one
    of 4). The scale is plain numbers from the spec, not state, so checkpoints keep the same keys.

    With `norm` (regression), the pooled features are standardized per dimension (fp32) by the
    running average of the mean and variance of every training batch so far (`track`), in training
    and evaluation alike, and the linear layer starts at zero, i.e. at the targets' mean. Why:
    pooled sentence features vary little between samples along any one direction, so a linear
    layer on them, moved by AdamW at lr 1e-3, ended the default epochs with predictions huddled
    around the mean (benchmarks/regression.py). Not a batch norm's per-batch statistics: batches
    of similar lengths (training/batches.py, bucketed) would each be centred on their own lengths,
    hiding whatever the targets owe to length (test MSE 0.53x the baseline on 4,000 rows against
    0.07x). A softmax needs no such spread: classification heads are unchanged."""

    def __init__(self, width: int, num_outputs: int, dropout: float, scale: tuple[float, float] | None = None,
                 norm: bool = False):
        super().__init__()
        self.norm = norm
        if norm:  # the running average (buffers: checkpoints and a resumed run keep it)
            self.register_buffer("in_mean", torch.zeros(width))
            self.register_buffer("in_var", torch.ones(width))
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_outputs)
        if norm:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.scale = scale

    @torch.no_grad()
    def track(self, x: torch.Tensor) -> None:
        """Fold a training batch's per-dimension mean and variance into the running average (equal
        weight for every batch since the run began; the first batch's stand alone)."""
        self.batches_seen += 1
        weight = 1.0 / self.batches_seen  # a tensor: no device sync on CUDA
        self.in_mean.lerp_(x.mean(0), weight)
        self.in_var.lerp_(x.var(0), weight)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and x.shape[0] > 1:  # a batch of one has no variance to add
                self.track(x.detach())
            return (x - self.in_mean) / torch.sqrt(self.in_var + NORM_EPS)

    def forward(self, x):
        if self.norm:
            x = self.standardize(x)
        y = self.out(self.dropout(x))
        if self.scale is None:
            return y
        mean, std = self.scale
        return y.double() * std + mean


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
            config.hidden_size, list(spec.tiers), spec.anchor, spec.reduction, spec.projection,
            post_ln=self.family.post_ln, dropout=spec.dropout, layer_norm_eps=self.family.layer_norm_eps(config),
            tier_score=spec.tier_score)
        self.late = nn.ModuleList(late)
        self.shared = nn.ModuleDict(shared or {})
        self.helpers = nn.ModuleDict(self.family.helpers(config))
        self.pooler = pooler
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale, spec.head_norm)
        use_fast_dropout(self)  # the late layers' dropouts too (see dropout.py)
        self._compiled = None  # a CompiledOrEager of the consolidation, after compile_consolidation()

    def compile_consolidation(self, log) -> None:
        """train.compile: training steps call torch.compile(consolidation), falling back to eager.
        A plain attribute, not a submodule: the state dict keeps the consolidation's own names."""
        from sherl_pipe.compiled import CompiledOrEager

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
        modules = {**self.shared, **self.helpers}
        context = self.family.prepare(self.config, modules, hidden, mask)
        for i, layer in enumerate(self.late):
            hidden = self.family.run_layer(layer, hidden, context, self.spec.anchor + i, modules)
        return self.family.finish(hidden, modules)

    def forward(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        hidden = self.late_route(self.consolidate(states, mask), mask)
        return self.head(pool(hidden, mask, self.spec.pooling, self.pooler))


class FullFinetuneModel(nn.Module):
    """The accuracy reference: the whole backbone trained, with the same pooling and head."""

    def __init__(self, spec: ModelSpec, backbone_model: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone_model
        self.family = family_of(backbone_model.config.model_type)
        self.head = Head(backbone_model.config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale,
                         spec.head_norm)
        use_fast_dropout(self)  # the same dropout as SHERL's, so the speed comparison stays fair

    def forward(self, input_ids, mask, token_type_ids=None) -> torch.Tensor:
        out = self.backbone(**self.family.forward_kwargs(self.backbone, input_ids, mask, token_type_ids))
        return self.head(pool(out.last_hidden_state, mask, self.spec.pooling, self.family.pooler(self.backbone)))


def norm_and_bias_parameters(module: nn.Module, norm_types: tuple[type, ...]) -> set[int]:
    """ids of a module's norm weights and biases (norms by type, as the family says) and of every bias."""
    out = set()
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if isinstance(sub, norm_types) or name == "bias":
                out.add(id(p))
    return out


def apply_late_tuning(model: SherlModel) -> None:
    """Set which pretrained weights train; gradients always flow through the late layers."""
    mode = model.spec.late_tuning
    pretrained = [model.late, model.shared] + ([model.pooler] if model.pooler is not None else [])
    for module in pretrained:
        module.requires_grad_(mode == "full")
    if mode == "norm-bias":
        for module in pretrained:
            chosen = norm_and_bias_parameters(module, model.family.norm_types)
            for p in module.parameters():
                p.requires_grad_(id(p) in chosen)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=model.spec.lora_rank, lora_alpha=model.spec.lora_alpha, lora_dropout=0.0,
                         target_modules=list(model.family.lora_targets))
        for i, layer in enumerate(model.late):
            model.late[i] = inject_adapter_in_model(cfg, layer)
        for name, p in model.late.named_parameters():
            p.requires_grad_("lora_" in name)


def parameter_groups(model: nn.Module, lr_new: float, lr_pretrained: float, weight_decay: float,
                     weight_decay_new: float = 0.0) -> list[dict]:
    """New modules (consolidation, head, LoRA) at lr_new with weight_decay_new (0 by default, as in
    SHERL's recipe); pretrained weights at fine-tuning rates with weight_decay, except their norms
    and biases."""
    new, decay, no_decay = [], [], []
    norm_bias = norm_and_bias_parameters(model, model.family.norm_types)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("consolidation.", "head.")) or "lora_" in name:
            new.append(p)
        elif id(p) in norm_bias:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": new, "lr": lr_new, "weight_decay": weight_decay_new, "name": "new"}]
    if decay:
        groups.append({"params": decay, "lr": lr_pretrained, "weight_decay": weight_decay, "name": "pretrained"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr_pretrained, "weight_decay": 0.0, "name": "pretrained-norm-bias"})
    return [g for g in groups if g["params"]]


def build_sherl_model(spec: ModelSpec, config, late: list[nn.Module], pooler: nn.Module | None,
                      shared: dict[str, nn.Module] | None = None) -> SherlModel:
    model = SherlModel(spec, config, late, pooler if spec.pooling == "cls-pooler" else None, shared)
    apply_late_tuning(model)
    return model


def empty_late_modules(spec: ModelSpec, config) -> tuple[list[nn.Module], nn.Module | None, dict[str, nn.Module]]:
    """Late layers, pooler and shared modules built from the config alone, for loading a checkpoint into."""
    family = family_of(config.model_type)
    late = [family.build_layer(config, i) for i in range(spec.anchor, spec.num_layers)]
    pooler = family.build_pooler(config) if spec.pooling == "cls-pooler" else None
    return late, pooler, {s.name: family.build_shared(config, s.name) for s in family.shared}
