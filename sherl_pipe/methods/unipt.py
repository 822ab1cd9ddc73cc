"""UniPT (Diao et al., CVPR 2024): a parallel network over every cached tier, following the
official code's text branch (github.com/Paranioar/UniPT, VSE-infty/lib/adapter_for_transformer.py,
`Our_tuning_for_transformer`), which needs only h[0..L] and never runs the backbone.

For width m = D / r (r = its reduction, 2 by default: the official m = D / 2):
    A = down_L(h[L]), T_j = down_j(h[j]) for j < L     down_j = LayerNorm(Linear(D, m)), one per tier
    S_j = A T_j^T  (per example, token by token)        padded keys zeroed
    W_j = relu(S_j) / (sum over keys of relu(S_j) + 1e-8) + I;   M_j = W_j T_j
    c_j = gate(mean(A) * mean(T_j))  (one Linear(m, 1); means over real tokens)
    pi = softmax over j of c_j;   M = sum_j pi_j M_j
    O = A + LayerNorm(Linear(m, m)(M));   Y = Linear(m, D)(relu(O))
then pooling and the head, as every method. Departures from the official code, which projects Y
to its retrieval embedding and pools it with GPO: Y has the backbone's width D and is pooled by
train.pooling (so it meets the same head as the other methods); initialisation is PyTorch's
default, as there; no dropout inside the module, as there. Defaults: lr 5e-4 (official, AdamW).
"""

from __future__ import annotations

import torch
from torch import nn

from sherl_pipe.methods.base import WidthEveryTier, every_tier, frozen
from sherl_pipe.methods.linear_probe import LastLayer
from sherl_pipe.model import Head, pool


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~keep, 0.0).sum(1) / keep.sum(1).clamp_min(1).to(x.dtype)


class UniPTNetwork(nn.Module):
    def __init__(self, width: int, reduced: int, layers: int):
        super().__init__()
        self.down = nn.ModuleList(nn.Sequential(nn.Linear(width, reduced), nn.LayerNorm(reduced))
                                  for _ in range(layers + 1))
        self.gate = nn.Linear(reduced, 1, bias=False)  # a bias shared by the tiers cancels in the softmax
        self.mix = nn.Sequential(nn.Linear(reduced, reduced), nn.LayerNorm(reduced))
        self.up = nn.Linear(reduced, width)

    def interact(self, anchor: torch.Tensor, tier: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """M_j: each token's own T_j plus its relu-weighted, L1-normalised summary of T_j's tokens."""
        scores = torch.relu(anchor @ tier.transpose(1, 2)).masked_fill(~keep.transpose(1, 2), 0.0)
        weights = scores / (scores.sum(-1, keepdim=True) + 1e-8)
        return weights @ tier + tier

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        keep = mask.bool().unsqueeze(-1)
        anchor = self.down[-1](states[-1])
        tiers = [down(h) for down, h in zip(self.down[:-1], states[:-1])]
        pooled = masked_mean(anchor, keep)
        confidence = torch.stack([self.gate(pooled * masked_mean(t, keep)) for t in tiers], 1)  # (B, L, 1)
        pi = torch.softmax(confidence, 1).unsqueeze(-1)  # (B, L, 1, 1)
        merged = (pi * torch.stack([self.interact(anchor, t, keep) for t in tiers], 1)).sum(1)
        out = self.up(torch.relu(anchor + self.mix(merged)))
        return out.masked_fill(~keep, 0.0)


class UniPTModel(nn.Module):
    def __init__(self, spec, config, modules: dict[str, nn.Module]):
        super().__init__()
        self.spec, self.config = spec, config
        reduced = max(1, config.hidden_size // spec.options.reduction)
        self.last = LastLayer(config, modules)
        self.unipt = UniPTNetwork(config.hidden_size, reduced, spec.num_layers)
        self.pooler = frozen(modules.get("pooler"))
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale, spec.head_norm)

    def hidden(self, batch) -> torch.Tensor:
        """UniPT's output, the (B, T, D) states the head pools."""
        states = every_tier(batch, self.spec.num_layers)
        states[-1] = self.last(states[-1])
        return self.unipt(states, batch.mask)

    def forward_batch(self, batch) -> torch.Tensor:
        return self.head(pool(self.hidden(batch), batch.mask, self.spec.pooling, self.pooler))

    def new_modules(self) -> list[nn.Module]:
        return [self.unipt, self.head]


class UniPT(WidthEveryTier):
    """The registry's entry: UniPT at width D / 2 by default (the official m = D / 2), lr 5e-4."""

    name = "unipt"
    lr = 5e-4
    reduction = 2
    trains = "per-tier down-projections, the interaction, the confidence gate, the up-projection + head"
    source_text = "Diao et al., CVPR 2024 (the official code's text branch)"
    Model = UniPTModel

