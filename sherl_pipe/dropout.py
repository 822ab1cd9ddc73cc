"""Dropout whose masks are cheap to draw on CPU.

torch's CPU dropout draws one Bernoulli sample per element from the 32-bit Mersenne Twister, and that
drawing was 9% of a stage-two step on 2 cores: five masks a step (consolidation, attention output,
feed-forward output, head and the attention probabilities), each as costly as a matmul of the layer.
The modules' masks come from here; the attention probabilities' stay torch's (transformers applies
that dropout with F.dropout or inside SDPA, not through a module).
Here one 64-bit draw gives four 16-bit numbers, each compared with a threshold: 4-5x less time for
the same mask distribution up to the 16-bit rounding of p (p = 0.1 drops with probability
6554/65536 = 0.100006; the kept values are scaled by 1 / (1 - that), so the expectation is exact).
Masks come from torch's default generator, like nn.Dropout's, so a run's seed (rng.py) and a
resumed run's saved generator state reproduce them. Other devices keep torch's own dropout.
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 1 << 16


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each element zeroed with probability round(p * 2**16) / 2**16, the rest scaled up."""
    cut = round(p * LEVELS)
    if cut == 0:
        return x
    if cut >= LEVELS:
        return x * 0.0
    n = x.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-2**15, 2**15)
    keep = (bits >= cut - LEVELS // 2).to(x.dtype)
    return x * keep.mul_(LEVELS / (LEVELS - cut))


class FastDropout(nn.Dropout):
    """nn.Dropout (same `p`, same train/eval behaviour) with fast_dropout's masks on CPU (never in
    place: the masked copy is returned, which autograd needs anyway)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p)


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every plain nn.Dropout inside `module` by a FastDropout of the same p (in place).
    Modules that read `.p` themselves (SDPA attention passes it to the kernel) keep working."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    return module
