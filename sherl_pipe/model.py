"""What every method's model shares: the spec a run folder keeps, pooling, the task head and the
parameter groups. The models themselves are the methods' (sherl_pipe/methods/).

`ModelSpec` is everything needed to rebuild a trained model from a run folder: with the backbone
config stored in the cache manifest, no backbone folder is needed to evaluate a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sherl_pipe.methods import DEFAULT as DEFAULT_METHOD
from sherl_pipe.methods import LEGACY_MODES
from sherl_pipe.consolidation import PAPER_ANCHOR_RESIDUAL, PAPER_TIER_SCORE
from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of


@dataclass(frozen=True)
class ModelSpec:
    task_type: str
    num_outputs: int
    num_layers: int
    late_layers: int
    tiers: tuple[int, ...]  # SHERL's consolidation inputs other than the anchor
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
    # How the consolidation starts (consolidation.ANCHOR_RESIDUALS); runs saved before it existed
    # started shut, and to_dict omits it there, so their specs compare equal.
    anchor_residual: str = PAPER_ANCHOR_RESIDUAL
    method: str = DEFAULT_METHOD  # train.method (sherl_pipe.methods)
    source: str = "cached"  # train.source: where its activations came from (cached, live)

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
        if self.anchor_residual == PAPER_ANCHOR_RESIDUAL:
            del d["anchor_residual"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """A spec as model.json keeps it; runs saved before methods existed have a `mode`."""
        d = dict(d)
        if "mode" in d:
            d["method"], d["source"] = LEGACY_MODES[d.pop("mode")]
        return cls(**{**d, "tiers": tuple(d["tiers"])})


def make_spec(cfg, manifest: dict) -> ModelSpec:
    """The model a train section asks for on a cache with this manifest, checked against it (a
    tier the cache lacks is refused before anything runs). Stage one calls it too, on the
    manifest a cache will have, to refuse a training request before extracting."""
    from sherl_pipe.methods import get_method

    method = get_method(cfg.method)
    source = cfg.source if cfg.source in method.sources else method.sources[0]  # fine-tuning: always live
    task = manifest["task"]
    return ModelSpec(
        task_type=task["type"], num_outputs=len(task["label_names"]) if task["type"] == "classification" else 1,
        num_layers=manifest["backbone"]["num_layers"], pooling=resolve_pooling(cfg.pooling, manifest),
        projection=cfg.projection, reduction=cfg.reduction or method.reduction, dropout=cfg.dropout,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, tier_score=cfg.tier_score,
        anchor_residual=cfg.anchor_residual, method=cfg.method,
        source=source, **method.spec_fields(cfg, manifest))


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


def norm_and_bias_parameters(module: nn.Module, norm_types: tuple[type, ...]) -> set[int]:
    """ids of a module's norm weights and biases (norms by type, as the family says) and of every bias."""
    out = set()
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if isinstance(sub, norm_types) or name == "bias":
                out.add(id(p))
    return out


def parameter_groups(model: nn.Module, new: set[int], lr_new: float, lr_pretrained: float, weight_decay: float,
                     weight_decay_new: float = 0.0) -> list[dict]:
    """The method's new parameters (ids in NEW: its own modules, the head, LoRA adapters) at lr_new
    with weight_decay_new (0 by default, as in SHERL's recipe); the pretrained weights it trains at
    fine-tuning rates with weight_decay, except their norms and biases."""
    groups = {"new": [], "pretrained": [], "pretrained-norm-bias": []}
    norm_bias = norm_and_bias_parameters(model, family_of(model.config.model_type).norm_types)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = "new" if id(p) in new else ("pretrained-norm-bias" if id(p) in norm_bias else "pretrained")
        groups[kind].append(p)
    rates = {"new": (lr_new, weight_decay_new), "pretrained": (lr_pretrained, weight_decay),
             "pretrained-norm-bias": (lr_pretrained, 0.0)}
    return [{"params": ps, "lr": rates[name][0], "weight_decay": rates[name][1], "name": name}
            for name, ps in groups.items() if ps]
