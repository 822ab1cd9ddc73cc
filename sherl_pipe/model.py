"""Stage two's model: consolidation -> late layer(s) -> pooling -> head, and the full fine-tuning
reference that runs the whole backbone with the same pooling and head.

`ModelSpec` is everything needed to rebuild a trained model from a run folder: with the backbone
config stored in the cache manifest, no backbone folder is needed to evaluate a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sherl_pipe.backbone import FAMILIES, attention_mask_for, family_of, run_layer
from sherl_pipe.consolidation import Consolidation
from sherl_pipe.errors import SherlError

LATE_LR = {"frozen": 0.0, "norm-bias": 5e-4, "lora": 3e-4, "full": 3e-5}
NEW_LR = 1e-3
FULL_FT_LR = 3e-5
LORA_TARGETS = ["query", "key", "value", "dense"]


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

    @property
    def anchor(self) -> int:
        return self.num_layers - self.late_layers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tiers"] = list(self.tiers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{**d, "tiers": tuple(d["tiers"])})


def config_from_manifest(manifest: dict, attn_implementation: str | None = None):
    """The backbone's transformers config, rebuilt from the copy stored in the cache manifest."""
    from transformers import AutoConfig

    stored = dict(manifest["backbone"]["config"])
    family_of(stored["model_type"])
    config = AutoConfig.for_model(stored.pop("model_type"), **stored)
    config._attn_implementation = attn_implementation or manifest["backbone"]["attn_implementation"]
    return config


def resolve_pooling(requested: str, manifest: dict) -> str:
    if requested != "auto":
        return requested
    st = manifest["backbone"].get("sentence_transformers_pooling")
    if st:
        return st
    return FAMILIES[manifest["backbone"]["model_type"]].default_pooling


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


class Head(nn.Module):
    def __init__(self, width: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_outputs)

    def forward(self, x):
        return self.out(self.dropout(x))


class SherlModel(nn.Module):
    """Consolidation of the cached tiers, then the late layers, pooling and the head."""

    def __init__(self, spec: ModelSpec, config, late: list[nn.Module], pooler: nn.Module | None):
        super().__init__()
        self.spec = spec
        self.config = config
        self.consolidation = Consolidation(
            config.hidden_size, list(spec.tiers), spec.anchor, spec.reduction, spec.projection,
            post_ln=family_of(config.model_type).post_ln, dropout=spec.dropout,
            layer_norm_eps=config.layer_norm_eps)
        self.late = nn.ModuleList(late)
        self.pooler = pooler
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout)

    def late_route(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The late layers on a (B, T, D) input with the usual attention mask: h[L]."""
        m4 = attention_mask_for(self.config, hidden, mask)
        for layer in self.late:
            hidden = run_layer(layer, hidden, m4)
        return hidden

    def forward(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        hidden = self.late_route(self.consolidation(states, mask), mask)
        return self.head(pool(hidden, mask, self.spec.pooling, self.pooler))


class FullFinetuneModel(nn.Module):
    """The accuracy reference: the whole backbone trained, with the same pooling and head."""

    def __init__(self, spec: ModelSpec, backbone_model: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone_model
        self.head = Head(backbone_model.config.hidden_size, spec.num_outputs, spec.dropout)

    def forward(self, input_ids, mask, token_type_ids=None) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
        pooler = getattr(self.backbone, "pooler", None)
        return self.head(pool(out.last_hidden_state, mask, self.spec.pooling, pooler))


NORM_TYPES = (nn.LayerNorm,)


def norm_and_bias_parameters(module: nn.Module) -> set[int]:
    """ids of a module's norm weights and biases (norms by type) and of every bias."""
    out = set()
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if isinstance(sub, NORM_TYPES) or name == "bias":
                out.add(id(p))
    return out


def apply_late_tuning(model: SherlModel) -> None:
    """Set which pretrained weights train; gradients always flow through the late layers."""
    mode = model.spec.late_tuning
    pretrained = [model.late] + ([model.pooler] if model.pooler is not None else [])
    for module in pretrained:
        module.requires_grad_(mode == "full")
    if mode == "norm-bias":
        for module in pretrained:
            chosen = norm_and_bias_parameters(module)
            for p in module.parameters():
                p.requires_grad_(id(p) in chosen)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=model.spec.lora_rank, lora_alpha=model.spec.lora_alpha, lora_dropout=0.0,
                         target_modules=LORA_TARGETS)
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
    norm_bias = norm_and_bias_parameters(model)
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


def build_sherl_model(spec: ModelSpec, config, late: list[nn.Module], pooler: nn.Module | None) -> SherlModel:
    model = SherlModel(spec, config, late, pooler if spec.pooling == "cls-pooler" else None)
    apply_late_tuning(model)
    return model


def empty_late_modules(spec: ModelSpec, config) -> tuple[list[nn.Module], nn.Module | None]:
    """Late layers and pooler built from the config alone, for loading a checkpoint into."""
    family = family_of(config.model_type)
    late = [family.layer_cls()(config, layer_idx=i) for i in range(spec.anchor, spec.num_layers)]
    pooler = family.pooler_cls()(config) if spec.pooling == "cls-pooler" else None
    return late, pooler
