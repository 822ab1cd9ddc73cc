"""Linear probe: the pooled last hidden state h[L] (after a pre-LN family's final norm), frozen,
into a linear head. The cheapest baseline from a cache that ends at the last layer."""

from __future__ import annotations

import torch
from torch import nn

from sherl_pipe.families import family_of
from sherl_pipe.methods.base import Method, frozen
from sherl_pipe.model import Head, pool


class LastLayer(nn.Module):
    """What a backbone outputs from h[L]: a pre-LN family's final norm (a shared module), frozen;
    nothing for post-LN families."""

    def __init__(self, config, modules: dict[str, nn.Module]):
        super().__init__()
        self.family = family_of(config.model_type)
        self.shared = nn.ModuleDict({s.name: frozen(modules[s.name]) for s in self.family.shared})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.family.finish(hidden, dict(self.shared))


class LinearProbeModel(nn.Module):
    def __init__(self, spec, config, modules: dict[str, nn.Module]):
        super().__init__()
        self.spec, self.config = spec, config
        self.last = LastLayer(config, modules)
        self.pooler = frozen(modules.get("pooler"))
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale, spec.head_norm)

    def forward_batch(self, batch) -> torch.Tensor:
        hidden = self.last(batch.states[self.spec.num_layers].float())
        return self.head(pool(hidden, batch.mask, self.spec.pooling, self.pooler))

    def new_modules(self) -> list[nn.Module]:
        return [self.head]


class LinearProbe(Method):
    name = "linear-probe"
    trains = "head only"
    source_text = "a linear probe of the last layer"
    Model = LinearProbeModel
