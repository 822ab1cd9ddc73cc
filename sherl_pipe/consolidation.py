"""SHERL's early-route consolidation (the paper's MTSA), applied to every token independently.

For tiers a_t = A_t(h[t]) projected from width D to d = D / r, with the anchor's projection as the
guide g and the other tiers as the set S:
    R_t = sum_{j in S} relu(cos(a_t, a_j))        redundancy (self included, so >= 1 unless a_t = 0)
    s_t = w . (a_t * g) + b                          one Linear d -> 1 shared by the tiers
    alpha_t = relu(s_t) / max(R_t, eps), then L1-normalised over t (all zero if every score <= 0)
    z = sum_t alpha_t a_t + g
    y = W_out relu(z) + b_out      (post-LN families: Dropout(LayerNorm(y)))
    out = y + tanh(gamma / T) * h[c]                 gamma = 0 at start, T = 0.1
Padding is cleared by selection (masked_fill), never by multiplying with the mask: inf * 0 is NaN.
The inputs are cleared too, so whatever a padded position held (the cache stores zeros, but a
caller may not) reaches neither the output nor the gradients; the output is zero there, so
nothing non-finite can reach the late layers' attention.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6
GATE_TEMPERATURE = 0.1


class GatedMLPProjection(nn.Module):
    """u = relu(W1 h); a = (W2 u + u) * sigmoid(W3 u)   (the official code's gated form)."""

    def __init__(self, width: int, reduced: int):
        super().__init__()
        self.down = nn.Linear(width, reduced)
        self.mix = nn.Linear(reduced, reduced)
        self.gate = nn.Linear(reduced, reduced)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.down(h))
        return (self.mix(u) + u) * torch.sigmoid(self.gate(u))


class LinearLNProjection(nn.Module):
    """a = LayerNorm(W h)   (the official code's other form)."""

    def __init__(self, width: int, reduced: int):
        super().__init__()
        self.down = nn.Linear(width, reduced)
        self.norm = nn.LayerNorm(reduced)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(h))


PROJECTIONS = {"gated-mlp": GatedMLPProjection, "linear-ln": LinearLNProjection}


def anti_redundancy_weights(others: torch.Tensor, guide: torch.Tensor, score: nn.Linear) -> torch.Tensor:
    """alpha over the tiers of S: others (..., n, d), guide (..., d) -> (..., n), rows summing to 1 or 0."""
    unit = others / others.norm(dim=-1, keepdim=True).clamp_min(EPS)
    redundancy = F.relu(unit @ unit.transpose(-1, -2)).sum(-1)  # (..., n): sum_j relu(cos(a_t, a_j))
    s = score(others * guide.unsqueeze(-2)).squeeze(-1)  # (..., n)
    alpha = F.relu(s) / redundancy.clamp_min(EPS)
    return alpha / alpha.sum(-1, keepdim=True).clamp_min(EPS)


class Consolidation(nn.Module):
    """Turns the cached tiers into the input of the late layers, in place of h[c]."""

    def __init__(self, width: int, tiers: list[int], anchor: int, reduction: int = 8,
                 projection: str = "gated-mlp", post_ln: bool = True, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        if anchor in tiers:
            tiers = [t for t in tiers if t != anchor]
        self.tiers = list(tiers)  # the set S (anchor excluded)
        self.anchor = anchor
        reduced = max(1, width // reduction)
        self.project = nn.ModuleDict({str(t): PROJECTIONS[projection](width, reduced)
                                      for t in self.tiers + [anchor]})
        self.score = nn.Linear(reduced, 1)
        self.up = nn.Linear(reduced, width)
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps) if post_ln else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(()))  # gamma: tanh(0) = 0, the anchor residual starts shut

    @property
    def inputs(self) -> list[int]:
        """Every tier the module reads, anchor last."""
        return self.tiers + [self.anchor]

    def _projected(self, states: dict[int, torch.Tensor], mask: torch.Tensor):
        """(padding, anchor, guide g, the other tiers' projections (B, T, n, d) or None), padding cleared."""
        pad = ~mask.bool().unsqueeze(-1)
        states = {t: states[t].masked_fill(pad, 0.0) for t in self.inputs}
        guide = self.project[str(self.anchor)](states[self.anchor])
        others = (torch.stack([self.project[str(t)](states[t]) for t in self.tiers], dim=-2)  # (B, T, n, d)
                  if self.tiers else None)
        return pad, states[self.anchor], guide, others

    def forward(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """states: tier -> (B, T, D); mask: (B, T), 1 for real tokens. Returns (B, T, D)."""
        pad, anchor, guide, others = self._projected(states, mask)
        z = guide
        if others is not None:
            alpha = anti_redundancy_weights(others, guide, self.score)
            z = (alpha.unsqueeze(-1) * others).sum(-2) + guide
        y = self.dropout(self.norm(self.up(F.relu(z))))
        y = y + torch.tanh(self.gate / GATE_TEMPERATURE) * anchor
        return y.masked_fill(pad, 0.0)

    def tier_weights(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor | None:
        """alpha of every token over the tiers of S, (B, T, n) in `self.tiers` order; None without S."""
        _, _, guide, others = self._projected(states, mask)
        return anti_redundancy_weights(others, guide, self.score) if others is not None else None

    def gate_value(self) -> float:
        """tanh(gamma / T): how much of h[c] passes the anchor residual (0 shut, 1 open)."""
        return float(torch.tanh(self.gate.detach() / GATE_TEMPERATURE))
