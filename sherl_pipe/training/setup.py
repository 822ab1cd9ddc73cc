"""What a training run is built from: the model, the optimizer and the schedule (the spec:
model.make_spec).

Stage two loads only what its method declares from the backbone folder (SHERL: the late layers,
the pooler for cls-pooler pooling), checked module by module against the cache manifest's hashes;
the fine-tuning methods, and `train.source = "live"`, load the backbone itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sherl_pipe.backbone import Backbone, family_of, load_module, module_hash
from sherl_pipe.cache import Cache
from sherl_pipe.config import TrainConfig
from sherl_pipe.errors import SherlError
from sherl_pipe.methods.spec import ModelSpec, config_from_manifest, make_spec  # noqa: F401 (make_spec: API)
from sherl_pipe.model import parameter_groups
from sherl_pipe.request import check_splits  # noqa: F401 (API)
from sherl_pipe.resources import resolve_model
from sherl_pipe.training.batches import LiveStates, SplitSource


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
    """(model, live early route or None): the method's model from the pretrained modules it
    declares, each verified against the cache's hashes; and, for train.source = "live", the early
    layers that compute the tiers it reads."""
    method = spec.plugin
    config = config_from_manifest(manifest)
    attn = manifest["backbone"]["attn_implementation"]
    if method.whole_backbone:
        backbone = Backbone(backbone_source, attn, "cpu")
        verify_backbone(backbone, manifest, list(manifest["backbone"]["module_hashes"]))
        modules = {"backbone": backbone.model}
    else:
        folder = resolve_model(backbone_source)
        names = method.loads(spec, family_of(config.model_type))
        modules = {name: verified_module(folder, config, manifest, name) for name in names}
    model = method.build(spec, config, modules).to(device)
    reads = method.reads(spec)
    live = None
    if spec.source == "live" and reads:
        backbone = Backbone(backbone_source, attn, device)
        verify_backbone(backbone, manifest, ["embeddings"] + [f"layer.{i}" for i in range(max(reads))])
        live = LiveStates(backbone, reads, manifest["dtype"], manifest.get("precision", "fp32"))
    return model, live


def learning_rates(spec: ModelSpec, cfg: TrainConfig) -> tuple[float, float]:
    """(new modules and head, pretrained weights being tuned): 0 in the config means the method's."""
    method = spec.plugin
    return cfg.lr or method.lr, cfg.lr_late or method.lr_pretrained(spec, cfg)


def build_optimizer(model: nn.Module, spec: ModelSpec, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all tensors) where torch has the fused form for the device: SHERL
    trains dozens of small tensors, and the per-tensor loop cost 4% of a cached step on CPU."""
    lr_new, lr_pre = learning_rates(spec, cfg)
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in model.parameters())
    new = spec.plugin.new_parameters(model)
    own = spec.plugin.parameter_groups(model, spec, cfg)
    clash = sorted({g["name"] for g in own} & {"new", "pretrained", "pretrained-norm-bias"})
    if clash:  # a method's own group under a usual group's name would read as that group in logs and checkpoints
        raise SherlError(f"method {spec.method}: its parameter group {clash[0]!r} has the name of a usual group; "
                         f"name it after what it trains")
    groups = parameter_groups(model, new, lr_new, lr_pre, cfg.weight_decay, cfg.weight_decay_new, own)
    return torch.optim.AdamW(groups, lr=lr_new, fused=fused or None)


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
    """A split's batches for this model: the tiers its method reads, from the cache when its source
    is (live runs compute them from the batches' input_ids)."""
    return SplitSource(cache, split, spec.plugin.reads(spec), read_tiers=spec.source == "cached",
                       preload=preload)
