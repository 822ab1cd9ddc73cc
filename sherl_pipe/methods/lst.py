"""LST, ladder side-tuning (Sung et al., NeurIPS 2022): a thin side network beside the backbone,
fed at every layer by a gated mix of its own state and a down-projection of the backbone's output
there. Follows the official code (github.com/ylsung/Ladder-Side-Tuning; the BART encoder variant,
the closest to a post-LN BERT): for width d = D / r (r = its reduction, 8 by default),
    s = Linear(D, d)(dropout(h[0]))                      the side input, from the embedding output
    for i in 0..L-1:  mu_i = sigmoid(alpha_i / T)        alpha_i = 0 at start, T = 0.1
                      s = mu_i * s + (1 - mu_i) * ladder_i(h[i + 1])     ladder_i = Linear(D, d)
                      s = side_block_i(s, mask)          the family's own layer at width d
    out = Linear(d, D)(s), pooled, into the head.
Side blocks keep the backbone's number of attention heads (the code divides the head width, not
their number) unless d is not a multiple of it, and its FFN width divided by r.
Departure: the official code initialises each side block from a copy of backbone layer i pruned
with Fisher information, which takes a backward pass through the whole backbone; a cache cannot
give it. Here the side network starts from the BERT initialisation N(0, 0.02) with zero biases
(the official code's random option, its CLIP-ViL default; its ladders and up-projection are
initialised so too). Defaults: lr 3e-3 (official GLUE), dropout as train.dropout.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sherl_pipe.dropout import use_fast_dropout
from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of
from sherl_pipe.methods.base import WidthEveryTier, every_tier, frozen
from sherl_pipe.model import Head, pool

GATE_TEMPERATURE = 0.1
WIDTH_KEYS = ("hidden_size", "dim")  # what the families' configs call the width ...
FFN_KEYS = ("intermediate_size", "hidden_dim")  # ... and the feed-forward width
HEAD_KEYS = ("num_attention_heads", "n_heads")


def side_config(config, reduction: int):
    """The backbone's config at width D / r (its heads kept, as the official code does)."""
    side = copy.deepcopy(config)
    for keys, div in ((WIDTH_KEYS, reduction), (FFN_KEYS, reduction)):
        for key in keys:
            if isinstance(getattr(side, key, None), int):
                setattr(side, key, max(1, getattr(side, key) // div))
    width = next(getattr(side, k) for k in WIDTH_KEYS if isinstance(getattr(side, k, None), int))
    for key in HEAD_KEYS:
        if isinstance(getattr(side, key, None), int):
            setattr(side, key, math.gcd(width, getattr(side, key)))
    return side, width


def bert_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SideNetwork(nn.Module):
    def __init__(self, config, reduction: int, dropout: float):
        super().__init__()
        self.family = family_of(config.model_type)
        self.config, width = side_config(config, reduction)
        layers = config.num_hidden_layers
        try:
            self.blocks = nn.ModuleList(self.family.build_layer(self.config, i) for i in range(layers))
            self.shared = nn.ModuleDict({s.name: self.family.build_shared(self.config, s.name)
                                         for s in self.family.shared})
        except Exception as exc:  # a family whose layers cannot be built narrower
            raise SherlError(f"train.method = 'lst': cannot build {config.model_type} side blocks of width {width} "
                             f"({exc}); use another method for this backbone") from None
        self.helpers = nn.ModuleDict(self.family.helpers(self.config))
        self.input = nn.Linear(config.hidden_size, width)
        self.ladders = nn.ModuleList(nn.Linear(config.hidden_size, width) for _ in range(layers))
        self.alpha = nn.Parameter(torch.zeros(layers))
        self.up = nn.Linear(width, config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        bert_init(self)

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        side = self.input(self.dropout(states[0]))
        modules = {**self.shared, **self.helpers}
        context = self.family.prepare(self.config, modules, side, mask)
        mu = torch.sigmoid(self.alpha / GATE_TEMPERATURE)
        for i, block in enumerate(self.blocks):
            side = mu[i] * side + (1 - mu[i]) * self.ladders[i](states[i + 1])
            side = self.family.run_layer(block, side, context, i, modules)
        side = self.family.finish(side, modules)
        return self.up(side).masked_fill(~mask.bool().unsqueeze(-1), 0.0)


class LSTModel(nn.Module):
    def __init__(self, spec, config, modules: dict[str, nn.Module]):
        super().__init__()
        self.spec, self.config = spec, config
        self.side = SideNetwork(config, spec.options.reduction, spec.dropout)
        self.pooler = frozen(modules.get("pooler"))
        self.head = Head(config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale, spec.head_norm)
        use_fast_dropout(self)

    def hidden(self, batch) -> torch.Tensor:
        """The side network's output, the (B, T, D) states the head pools."""
        return self.side(every_tier(batch, self.spec.num_layers), batch.mask)

    def forward_batch(self, batch) -> torch.Tensor:
        return self.head(pool(self.hidden(batch), batch.mask, self.spec.pooling, self.pooler))

    def new_modules(self) -> list[nn.Module]:
        return [self.side, self.head]


class LST(WidthEveryTier):
    """The registry's entry: LST's side network at width D / 8 by default, lr 3e-3 (official GLUE)."""

    name = "lst"
    lr = 3e-3
    trains = "the side network (input and ladder projections, gates, side blocks, up-projection) + head"
    source_text = "Sung et al., NeurIPS 2022 (the official code, randomly initialised side blocks)"
    Model = LSTModel


    def loads(self, spec, family) -> list[str]:
        return ["pooler"] if spec.pooling == "cls-pooler" else []
