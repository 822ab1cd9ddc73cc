"""What every method's model shares: pooling, the task head and the parameter groups. The models
themselves are the methods' (sherl_pipe/methods/), and the spec a run folder keeps is
methods/spec.py's ModelSpec.
"""

from __future__ import annotations

import torch
from torch import nn

from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of


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
                     weight_decay_new: float = 0.0, own: list[dict] = ()) -> list[dict]:
    """The method's OWN groups first (Method.parameter_groups: each with its name, rate and decay);
    then its new parameters (ids in NEW: its own modules, the head, LoRA adapters) at lr_new with
    weight_decay_new (0 by default, as in SHERL's recipe); the pretrained weights it trains at
    fine-tuning rates with weight_decay, except their norms and biases."""
    own = [{**g, "params": list(g["params"])} for g in own]  # a generator of parameters is read once
    taken = {id(p) for g in own for p in g["params"]}
    groups = {"new": [], "pretrained": [], "pretrained-norm-bias": []}
    norm_bias = norm_and_bias_parameters(model, family_of(model.config.model_type).norm_types)
    for p in model.parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        kind = "new" if id(p) in new else ("pretrained-norm-bias" if id(p) in norm_bias else "pretrained")
        groups[kind].append(p)
    rates = {"new": (lr_new, weight_decay_new), "pretrained": (lr_pretrained, weight_decay),
             "pretrained-norm-bias": (lr_pretrained, 0.0)}
    usual = [{"params": ps, "lr": rates[name][0], "weight_decay": rates[name][1], "name": name}
             for name, ps in groups.items() if ps]
    return [g for g in own if g["params"]] + usual
