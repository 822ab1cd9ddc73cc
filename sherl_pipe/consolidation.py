"""SHERL's early-route consolidation (the paper's MTSA), applied to every token independently.

For tiers a_t = A_t(h[t]) projected from width D to d = D / r, with the projection of the anchor h[c]
(c = L - k, k = train.late_layers) as the guide g and the other tiers as the set S:
    R_t = sum_{j in S} relu(cos(a_t, a_j))        redundancy (self included, so >= 1 unless a_t = 0)
    s_t = w . (a_t * g) + b                          one Linear d -> 1 shared by the tiers
    alpha_t = relu(s_t) / max(R_t, eps), then L1-normalised over t (all zero if every score <= 0)
    z = sum_t alpha_t a_t + g
That alpha is the paper's form, train.tier_score = "relu". The others (TIER_SCORES) replace relu
by softplus or exp (exp: a softmax over the tiers of s_t - log R_t, never all zero), and the
"-normed" ones score the RMS-normalised product, s_t = w . (x_t / rms(x_t)) + b with x_t = a_t * g.
    y = W_out relu(z) + b_out      (post-LN families: Dropout(LayerNorm(y)))
    out = y + tanh(gamma / T) * h[c]                 T = 0.1; gamma = 0 at start (or open: ANCHOR_RESIDUALS)
Padding is cleared by selection (masked_fill), never by multiplying with the mask: inf * 0 is NaN.
The inputs are cleared too, so whatever a padded position held (the cache stores zeros, but a
caller may not) reaches neither the output nor the gradients; the output is zero there, so
nothing non-finite can reach the late layers' attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6
GATE_TEMPERATURE = 0.1
# How the module starts (train.anchor_residual): the anchor residual's gate gamma, and whether its
# own output y starts at zero. "shut" is the paper's: y replaces h[c] and the late layers first see
# a random projection of the tiers. "open": tanh(0.3 / T) = 0.995 of h[c] passes and y starts at
# zero (its LayerNorm's scale, or for pre-LN families W_out and b_out), so the late layers start on
# the pretrained path and y learns a correction (measured: docs/results/2026-12-02-consolidation-start.md).
ANCHOR_RESIDUALS = {"shut": 0.0, "open": 0.3}
PAPER_ANCHOR_RESIDUAL = "shut"


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

    @staticmethod
    def grouped(modules: list["GatedMLPProjection"], x: torch.Tensor) -> torch.Tensor:
        """Every tier's projection at once: x (n, N, D) -> (n, N, d), tier i through modules[i].
        Two batched matmuls (mix and gate share one) instead of three Linear calls per tier."""
        down_w, down_b = _stacked(modules, "down")
        u = F.relu(torch.baddbmm(down_b, x, down_w))
        mix_w, mix_b = _stacked(modules, "mix")
        gate_w, gate_b = _stacked(modules, "gate")
        mg = torch.baddbmm(torch.cat([mix_b, gate_b], -1), u, torch.cat([mix_w, gate_w], -1))
        mix, gate = mg.chunk(2, dim=-1)
        return (mix + u) * torch.sigmoid(gate)


class LinearLNProjection(nn.Module):
    """a = LayerNorm(W h)   (the official code's other form)."""

    def __init__(self, width: int, reduced: int):
        super().__init__()
        self.down = nn.Linear(width, reduced)
        self.norm = nn.LayerNorm(reduced)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(h))

    @staticmethod
    def grouped(modules: list["LinearLNProjection"], x: torch.Tensor) -> torch.Tensor:
        """x (n, N, D) -> (n, N, d): one batched matmul, one normalisation, per-tier scale and shift."""
        down_w, down_b = _stacked(modules, "down")
        y = F.layer_norm(torch.baddbmm(down_b, x, down_w), (down_w.shape[-1],), eps=modules[0].norm.eps)
        scale = torch.stack([m.norm.weight for m in modules]).unsqueeze(1)
        shift = torch.stack([m.norm.bias for m in modules]).unsqueeze(1)
        return torch.addcmul(shift, y, scale)


def _stacked(modules: list[nn.Module], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The named Linear of every module as batched-matmul operands: weights (n, in, out), biases (n, 1, out).
    Stacked at every call (a few hundred KB), so the parameters and checkpoints stay one Linear per tier."""
    linears = [getattr(m, name) for m in modules]
    return (torch.stack([lin.weight for lin in linears]).transpose(1, 2),
            torch.stack([lin.bias for lin in linears]).unsqueeze(1))


PROJECTIONS = {"gated-mlp": GatedMLPProjection, "linear-ln": LinearLNProjection}


@dataclass(frozen=True)
class TierScore:
    """How a tier's score s_t becomes its weight (train.tier_score). `activation` maps s_t to a
    non-negative relevance f(s_t): relu (the paper: 0 below 0, and no gradient there), softplus
    (log(1 + e^s), positive everywhere) or exp (with the L1 normalisation, a softmax over the
    tiers of s_t - log R_t, as UniPT weighs its tiers). `normalised` scores the RMS-normalised
    product a_t * g / rms(a_t * g) instead of the raw one. `bias` sets the score's bias at
    initialisation (None: PyTorch's default, uniform in +-1/sqrt(d))."""

    activation: str
    normalised: bool = False
    bias: float | None = None

    @property
    def can_die(self) -> bool:
        """Whether a token's weights can all be 0 (relu's dead zone): only then is "alive" a measure."""
        return self.activation == "relu"


# Why the non-paper forms exist (benchmarks/consolidation.py, docs/methods.md "The consolidation's
# tier score"): a_t * g has an RMS of about 0.02 per element for MiniLM, so w . (a_t * g) varies across
# tokens by about 0.01 while the default bias starts uniform in +-0.14: its sign decides for every
# token at once, and relu's dead zone then keeps a consolidation that starts below 0 dead for good.
TIER_SCORES = {
    "relu": TierScore("relu"),
    "softplus": TierScore("softplus"),
    "softmax": TierScore("exp"),
    "relu-normed": TierScore("relu", normalised=True, bias=1.0),
    "softplus-normed": TierScore("softplus", normalised=True),
    "softmax-normed": TierScore("exp", normalised=True),
}
PAPER_TIER_SCORE = "relu"
DEFAULT_TIER_SCORE = "softmax-normed"  # no dead zone, tokens differ from the start (TIER_SCORES)


def tier_scores(others: torch.Tensor, guide: torch.Tensor, score: nn.Linear, form: TierScore) -> torch.Tensor:
    """s_t = w . x_t + b with x_t = a_t * g (normalised: divided by its RMS over d); (n, ..., d) -> (n, ...)."""
    x = others * guide
    if form.normalised:
        x = F.rms_norm(x, (x.shape[-1],), eps=EPS)
    return F.linear(x, score.weight, score.bias).squeeze(-1)


def anti_redundancy_weights(others: torch.Tensor, guide: torch.Tensor, score: nn.Linear,
                            form: TierScore = TIER_SCORES[PAPER_TIER_SCORE]) -> torch.Tensor:
    """alpha over the tiers of S: others (..., n, d), guide (..., d) -> (..., n), rows summing to 1
    (to 0 where the form is relu and every score is <= 0)."""
    return _tier_major_weights(others.movedim(-2, 0), guide, score, form).movedim(0, -1)


def _log_softplus(s: torch.Tensor) -> torch.Tensor:
    """log(softplus(s)) without underflow: below -20, log(log(1 + e^s)) = s to within e^s / 2 < 1e-9
    (softplus itself reaches 0 in float32 below about -104, which would make a token dead). The
    other branch sees a harmless 0 there, so its gradient cannot be inf * 0 = NaN."""
    low = s < -20
    return torch.where(low, s, torch.log(F.softplus(torch.where(low, torch.zeros_like(s), s))))


def _weights(s: torch.Tensor, redundancy: torch.Tensor, activation: str) -> torch.Tensor:
    """f(s_t) / R_t over the tiers (dim 0), before the L1 normalisation. relu is the paper's form,
    computed as before train.tier_score existed. softplus and exp are taken in the log domain and
    scaled so that each token's largest weight is 1 (the normalisation cancels the scale), so that
    the clamp in the normalisation cannot zero a token whose relevances are all tiny."""
    if activation == "relu":
        return F.relu(s) / redundancy.clamp_min(EPS)
    log_f = s if activation == "exp" else _log_softplus(s)
    logits = log_f - torch.log(redundancy.clamp_min(EPS))
    return torch.exp(logits - logits.amax(0, keepdim=True).detach())


def _tier_major_weights(others: torch.Tensor, guide: torch.Tensor, score: nn.Linear,
                        form: TierScore = TIER_SCORES[PAPER_TIER_SCORE]) -> torch.Tensor:
    """anti_redundancy_weights with the tiers first: others (n, ..., d), guide (..., d) -> (n, ...).
    Tier-major keeps every operand contiguous, as the grouped projections produce them."""
    unit = others / others.norm(dim=-1, keepdim=True).clamp_min(EPS)
    # sum_j relu(cos(a_t, a_j)): one n x n Gram matrix per token, so memory grows with n^2, not n^2 d
    # (a broadcast product over (n, n, ..., d) was 190 MB a step for BERT-base's 11 tiers)
    tokens = unit.movedim(0, -2)  # (..., n, d)
    redundancy = F.relu(tokens @ tokens.transpose(-1, -2)).sum(-1).movedim(-1, 0)  # (n, ...)
    alpha = _weights(tier_scores(others, guide, score, form), redundancy, form.activation)
    return alpha / alpha.sum(0, keepdim=True).clamp_min(EPS)


def _start_at_zero(module: nn.Module) -> None:
    """The consolidation's own output at zero: the scale of its LayerNorm (post-LN), or W_out and
    b_out (pre-LN). Their gradients are not zero, so y grows from there."""
    with torch.no_grad():
        for name in ("weight", "bias") if isinstance(module, nn.Linear) else ("weight",):
            getattr(module, name).zero_()


class Consolidation(nn.Module):
    """Turns the cached tiers into the input of the late layers, in place of the anchor h[c]
    (c = L - k, k = train.late_layers)."""

    def __init__(self, width: int, tiers: list[int], anchor: int, reduction: int = 8,
                 projection: str = "gated-mlp", post_ln: bool = True, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, tier_score: str = PAPER_TIER_SCORE,
                 anchor_residual: str = PAPER_ANCHOR_RESIDUAL):
        super().__init__()
        self.tier_score = tier_score
        self.form = TIER_SCORES[tier_score]
        if anchor in tiers:
            tiers = [t for t in tiers if t != anchor]
        self.tiers = list(tiers)  # the set S (anchor excluded)
        self.anchor = anchor
        reduced = max(1, width // reduction)
        self.project = nn.ModuleDict({str(t): PROJECTIONS[projection](width, reduced)
                                      for t in self.tiers + [anchor]})
        self.score = nn.Linear(reduced, 1)
        if self.form.bias is not None:
            nn.init.constant_(self.score.bias, self.form.bias)
        self.up = nn.Linear(reduced, width)
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps) if post_ln else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.tensor(ANCHOR_RESIDUALS[anchor_residual]))  # gamma (shut: tanh(0) = 0)
        if anchor_residual == "open":
            _start_at_zero(self.norm if post_ln else self.up)

    @property
    def inputs(self) -> list[int]:
        """Every tier the module reads, anchor last."""
        return self.tiers + [self.anchor]

    def _inputs(self, states: dict[int, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """(n + 1, B, T, D) float32, the tiers in `inputs` order, padding cleared. Each tier is copied
        once, converting from its storage dtype (float16 from the cache) on the way, into one buffer
        that is cleared in one pass. Under torch.export (sherl-pipe export) the buffer would become one
        full-size scatter per tier (a fifth of ONNX Runtime's time): stacked instead."""
        tiers = [states[t] for t in self.inputs]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tiers)  # `out=`/copy_ record no gradient
        if grad or torch.compiler.is_exporting():
            return torch.stack([t.float() for t in tiers]).masked_fill(~keep, 0.0)
        x = tiers[0].new_empty((len(tiers),) + tuple(tiers[0].shape), dtype=torch.float32)
        for i, t in enumerate(tiers):
            x[i].copy_(t)
        return x.masked_fill_(~keep, 0.0)

    def _projected(self, states: dict[int, torch.Tensor], mask: torch.Tensor):
        """(keep, inputs (n + 1, B, T, D), guide g (N, d), the other tiers' projections (n, N, d) or None),
        N = B * T tokens; every tier is projected by one grouped call."""
        keep = mask.bool().unsqueeze(-1)
        x = self._inputs(states, keep)
        modules = [self.project[str(t)] for t in self.inputs]
        a = type(modules[0]).grouped(modules, x.flatten(1, 2))  # (n + 1, N, d)
        return keep, x, a[-1], (a[:-1] if self.tiers else None)

    def forward(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """states: tier -> (B, T, D) in any float dtype; mask: (B, T), 1 for real tokens. Returns (B, T, D)."""
        keep, x, guide, others = self._projected(states, mask)
        z = guide
        if others is not None:
            alpha = _tier_major_weights(others, guide, self.score, self.form)  # (n, N)
            z = (alpha.unsqueeze(-1) * others).sum(0) + guide
        y = self.dropout(self.norm(self.up(F.relu(z)))).view(x.shape[1:])
        y = y + torch.tanh(self.gate / GATE_TEMPERATURE) * x[-1]
        return y.masked_fill(~keep, 0.0)

    def tier_weights(self, states: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor | None:
        """alpha of every token over the tiers of S, (B, T, n) in `self.tiers` order; None without S."""
        got = self.scores_and_weights(states, mask)
        return None if got is None else got[1]

    def scores_and_weights(self, states: dict[int, torch.Tensor], mask: torch.Tensor):
        """(s, alpha) of every token over the tiers of S, each (B, T, n) in `self.tiers` order; None
        without S. The scores are what a diagnosis needs: with relu, a token whose scores are all
        <= 0 is dead (benchmarks/consolidation.py)."""
        keep, _, guide, others = self._projected(states, mask)
        if others is None:
            return None
        shape = keep.shape[:2] + (len(self.tiers),)
        s = tier_scores(others, guide, self.score, self.form)
        alpha = _tier_major_weights(others, guide, self.score, self.form)
        return s.t().reshape(shape), alpha.t().reshape(shape)

    def gate_value(self) -> float:
        """tanh(gamma / T): how much of h[c] passes the anchor residual (0 shut, 1 open)."""
        return float(torch.tanh(self.gate.detach() / GATE_TEMPERATURE))
