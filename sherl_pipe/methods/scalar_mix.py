"""Scalar-mix probe (ELMo, Peters et al. 2018; SUPERB's weighted sum, Yang et al. 2021): a softmax-
weighted sum of every cached tier h[0..L], each layer-normalised (no affine), scaled by a learned
gamma, pooled, into a linear head. The strongest cheap baseline from per-layer activations."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sherl_pipe.methods.base import EveryTier, frozen
from sherl_pipe.model import Head, pool


class ScalarMixModel(nn.Module):
    def __init__(self, spec, config, modules: dict[str, nn.Module]):
        super().__init__()
        self.spec, self.config = spec, config
        self.mix = nn.ParameterDict({"weights": nn.Parameter(torch.zeros(spec.num_layers + 1)),
                                     "gamma": nn.Parameter(torch.ones(()))})
        self.pooler = frozen(modules.get("pooler"))
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale, spec.head_norm)

    def forward_batch(self, batch) -> torch.Tensor:
        weights = torch.softmax(self.mix["weights"], 0)
        mixed = 0.0
        for i in range(self.spec.num_layers + 1):
            h = batch.states[i].float()
            mixed = mixed + weights[i] * F.layer_norm(h, h.shape[-1:])
        return self.head(pool(self.mix["gamma"] * mixed, batch.mask, self.spec.pooling, self.pooler))

    def new_modules(self) -> list[nn.Module]:
        return [self.mix, self.head]


class ScalarMix(EveryTier):
    name = "scalar-mix"
    trains = "one weight per tier, a scale, and the head"
    source_text = "ELMo's scalar mix / SUPERB's weighted sum"
    Model = ScalarMixModel
