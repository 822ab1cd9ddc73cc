"""What a training run is built from: the model spec, the model, the optimizer and the schedule.

Stage two loads only what its mode needs from the backbone folder: the late layers (and the
pooler) in `cached` mode, checked module by module against the hashes in the cache's manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sherl_pipe.backbone import Backbone, family_of, load_module, module_hash
from sherl_pipe.cache import Cache
from sherl_pipe.config import TrainConfig
from sherl_pipe.errors import SherlError
from sherl_pipe.model import (FULL_FT_LR, LATE_LR, NEW_LR, FullFinetuneModel, ModelSpec, build_sherl_model,
                              config_from_manifest, parameter_groups, resolve_pooling)
from sherl_pipe.resources import resolve_model
from sherl_pipe.training.batches import LiveStates, SplitSource


def make_spec(cfg: TrainConfig, manifest: dict) -> ModelSpec:
    num_layers = manifest["backbone"]["num_layers"]
    anchor = num_layers - cfg.late_layers
    stored = manifest["tiers"]
    tiers: list[int] = []
    if cfg.mode != "full-finetune":
        if cfg.late_layers >= num_layers:  # re-extracting cannot help: the backbone is too shallow
            raise SherlError(f"train.late_layers = {cfg.late_layers}: the backbone has {num_layers} layers and at "
                             f"least one must stay early (cached); set train.late_layers to at most {num_layers - 1}")
        if anchor not in stored:
            raise SherlError(f"train.late_layers = {cfg.late_layers}: its anchor h[{anchor}] is not in the cache "
                             f"(stored tiers {stored}); choose late_layers with L - k in the stored tiers, or "
                             f"extract the cache with extract.late_layers = {cfg.late_layers}")
        tiers = list(cfg.tiers) if cfg.tiers else [t for t in stored if t < anchor]
        bad = [t for t in tiers if t not in stored or t > anchor]
        if bad:
            raise SherlError(f"train.tiers: tier {bad[0]} is not a stored tier at or below the anchor h[{anchor}] "
                             f"(stored: {stored})")
        tiers = sorted(set(tiers) - {anchor})
    task = manifest["task"]
    return ModelSpec(
        mode=cfg.mode, task_type=task["type"],
        num_outputs=len(task["label_names"]) if task["type"] == "classification" else 1,
        num_layers=num_layers, late_layers=cfg.late_layers, tiers=tuple(tiers),
        pooling=resolve_pooling(cfg.pooling, manifest), projection=cfg.projection, reduction=cfg.reduction,
        dropout=cfg.dropout, late_tuning=cfg.late_tuning if cfg.mode != "full-finetune" else "full",
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, tier_score=cfg.tier_score)


def check_splits(cfg: TrainConfig, splits: list[str], cache: str) -> None:
    """The splits training reads (train, and train.eval_split when set) are among the cache's."""
    if "train" not in splits:
        raise SherlError(f"{cache}: has no 'train' split (has: {', '.join(splits)})")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise SherlError(f"train.eval_split = '{cfg.eval_split}': {cache} has no such split (has: "
                         f"{', '.join(splits)}); set train.eval_split to one of them, or to \"\" to train "
                         f"without evaluation (no best checkpoint, no early stopping)")


def verified_module(folder: Path, config, manifest: dict, name: str) -> nn.Module:
    """One pretrained module loaded from the backbone folder, checked against the cache's hash."""
    expected = manifest["backbone"]["module_hashes"].get(name)
    if expected is None:
        raise SherlError(f"cache manifest has no hash for backbone module '{name}'; re-extract the cache")
    module = load_module(folder, config, family_of(config.model_type), name)
    if module_hash(module) != expected:
        raise SherlError(f"backbone {folder}: module '{name}' differs from the one the cache was made with "
                         f"(hash mismatch); use the backbone the cache was extracted from, or re-extract")
    return module


def verify_backbone(backbone: Backbone, manifest: dict, names: list[str]) -> None:
    got = backbone.module_hashes()
    bad = [n for n in names if got.get(n) != manifest["backbone"]["module_hashes"].get(n)]
    if bad:
        raise SherlError(f"backbone {backbone.folder}: module(s) {', '.join(bad)} differ from the ones the cache "
                         f"was made with (hash mismatch); use the backbone the cache was extracted from")


def build_model(spec: ModelSpec, backbone_source: str, manifest: dict, device: str):
    """(model, live early route or None). Loads only what the mode needs from the backbone folder."""
    attn = manifest["backbone"]["attn_implementation"]
    if spec.mode == "full-finetune":
        backbone = Backbone(backbone_source, attn, "cpu")
        verify_backbone(backbone, manifest, list(manifest["backbone"]["module_hashes"]))
        return FullFinetuneModel(spec, backbone.model).to(device), None
    config = config_from_manifest(manifest)
    folder = resolve_model(backbone_source)
    late = [verified_module(folder, config, manifest, f"layer.{i}") for i in range(spec.anchor, spec.num_layers)]
    pooler = verified_module(folder, config, manifest, "pooler") if spec.pooling == "cls-pooler" else None
    shared = {s.name: verified_module(folder, config, manifest, s.name) for s in family_of(config.model_type).shared}
    model = build_sherl_model(spec, config, late, pooler, shared).to(device)
    live = None
    if spec.mode == "live":
        backbone = Backbone(backbone_source, attn, device)
        verify_backbone(backbone, manifest, ["embeddings"] + [f"layer.{i}" for i in range(spec.anchor)])
        live = LiveStates(backbone, list(spec.tiers) + [spec.anchor], manifest["dtype"])
    return model, live


def learning_rates(spec: ModelSpec, cfg: TrainConfig) -> tuple[float, float]:
    """(new modules and head, pretrained weights being tuned): 0 in the config means the default."""
    lr_new = cfg.lr or NEW_LR
    if spec.mode == "full-finetune":
        return lr_new, cfg.lr_late or FULL_FT_LR
    return lr_new, cfg.lr_late or LATE_LR[spec.late_tuning]


def build_optimizer(model: nn.Module, spec: ModelSpec, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all tensors) where torch has the fused form for the device: SHERL
    trains dozens of small tensors, and the per-tensor loop cost 4% of a cached step on CPU."""
    lr_new, lr_pre = learning_rates(spec, cfg)
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(parameter_groups(model, lr_new, lr_pre, cfg.weight_decay, cfg.weight_decay_new),
                             lr=lr_new, fused=fused or None)


def warmup_linear(total_steps: int, warmup_steps: int):
    """Linear warm-up over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, int(warmup_ratio * total_steps)))


def source_for(cache: Cache, split: str, spec: ModelSpec, preload: bool = False) -> SplitSource:
    """A split's batches for this model: tiers read from the cache only in `cached` mode."""
    return SplitSource(cache, split, list(spec.tiers) + [spec.anchor], read_tiers=spec.mode == "cached",
                       preload=preload)
