"""Scalable Weight Reparametrization (SWR; Kim et al., ICASSP 2023, arXiv 2302.13435) as sherl-pipe
builds it: a policy network decides which of a pretrained model's weight tensors to reparametrize,
under a budget on the number of weights updated, and after training the reparametrization is merged
into the weights, so the model has the backbone's parameters and inference cost.

The paper gives the idea (a policy trained jointly with the reparametrization, a constraint on the
updated parameters, the policy dropped after transfer) but no code; these are our choices, which
docs/methods.md states as such:
- units: every Linear of a transformer layer that the family names as a LoRA target (attention
  projections and feed-forward matrices); a unit's weight is W + g * dW, W frozen, dW trained (zero
  at the start, so training starts from the pretrained model), g in {0, 1} the policy's gate;
- the policy: a small MLP over each unit's description (depth, kind, size) giving a logit; during
  the search phase each training step samples the gates from a Gumbel-sigmoid (binary concrete)
  relaxation, hard in the forward pass and soft in the backward one (straight through), so the
  task's loss reaches the policy through g; a penalty on the expected share of weights updated
  ((E - budget) / budget)^2 steers the policy to the budget;
- the constraint is enforced, not only encouraged: when the search ends, the units are taken in
  order of the policy's probability while their weights fit the budget (and evaluation during the
  search uses that same choice); the other units' dW are zeroed and frozen, and fine-tuning goes
  on with the chosen ones;
- merged: W + dW for the chosen units, plain nn.Linear modules again, the policy gone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

TAU = 0.5  # the Gumbel-sigmoid's temperature: hard enough that the soft gates track the sampled ones
POLICY_WIDTH = 32
OFF, SEARCH, FIXED = "off", "search", "fixed"  # the modes: no dW; gates drawn; the chosen units


class ReparamLinear(nn.Module):
    """A pretrained Linear whose weight is W + g dW. The parameters keep the Linear's names
    (weight, bias), so the pretrained weights load into it unchanged; `delta` is dW."""

    def __init__(self, base: nn.Linear, gates: "Reparametrization", index: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros_like(base.weight))
        object.__setattr__(self, "_owner", gates)  # not a submodule: the owner is registered elsewhere
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._owner.weight_of(self), self.bias)

    def merged(self, chosen: bool) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta if chosen else self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.requires_grad_(False)


class Reparametrization(nn.Module):
    """The policy over a model's units, their gates, and the choice it makes.

    `chosen` (a buffer, so checkpoints keep it) is -1 until the search ends, then 1 for a chosen
    unit and 0 for the others. BUDGET: the weights that may be updated, a count; TOTAL: the count
    it is a share of (the whole backbone's candidate weights), for the report."""

    def __init__(self, units: list[tuple[nn.Module, str, str, int]], num_layers: int, budget: int, total: int):
        super().__init__()
        wrapped = []
        for i, (parent, attr, _, _) in enumerate(units):
            module = ReparamLinear(getattr(parent, attr), self, i)
            setattr(parent, attr, module)
            wrapped.append((parent, attr, module))
        object.__setattr__(self, "_units", wrapped)  # the model owns the modules; these are references
        self.names = [name for _, _, name, _ in units]
        sizes = torch.tensor([float(m.weight.numel()) for _, _, m in wrapped])
        self.register_buffer("sizes", sizes)
        self.register_buffer("descriptors", describe(units, num_layers, sizes))
        self.register_buffer("chosen", torch.full((len(units),), -1.0))
        self.budget, self.total = int(budget), int(total)
        self.policy = nn.Sequential(nn.Linear(self.descriptors.shape[1], POLICY_WIDTH), nn.Tanh(),
                                    nn.Linear(POLICY_WIDTH, 1))
        with torch.no_grad():  # every unit starts at the probability that spends the budget on average
            self.policy[2].weight.mul_(0.01)
            self.policy[2].bias.fill_(logit(self.target() / max(float(sizes.sum()), 1.0)))
        self.mode = SEARCH
        self._gates: torch.Tensor | None = None
        self._keep: list[bool] = []

    # --- the policy -----------------------------------------------------------------------------
    def target(self) -> float:
        """The weights the search aims at: the budget, or every candidate where they fit in it."""
        return float(min(self.budget, float(self.sizes.sum())))

    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.policy(self.descriptors).squeeze(-1))

    def budget_penalty(self) -> torch.Tensor:
        """((expected weights updated - target) / target)^2: the constraint as a loss term."""
        target = max(self.target(), 1.0)
        expected = (self.probabilities() * self.sizes).sum()
        return ((expected - target) / target) ** 2

    @torch.no_grad()
    def projected(self) -> torch.Tensor:
        """The choice the constraint allows: units by the policy's probability (ties: in order),
        each taken while its weights still fit the budget."""
        probs = self.probabilities()
        order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
        mask, used = torch.zeros_like(probs), 0.0
        for i in order:
            if used + float(self.sizes[i]) <= self.budget:
                mask[i], used = 1.0, used + float(self.sizes[i])
        return mask

    def draw(self, training: bool) -> None:
        """The gates of the next forward pass: sampled (straight through) while searching in
        training; the projected or chosen units otherwise."""
        if self.mode == SEARCH and training:
            logits = self.policy(self.descriptors).squeeze(-1)
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / TAU)
            self._gates = (soft > 0.5).float() + soft - soft.detach()
        elif self.mode == SEARCH:
            self._gates = self.projected()
        else:
            self._gates = None

    def weight_of(self, unit: ReparamLinear) -> torch.Tensor:
        if self.mode == OFF:
            return unit.weight
        if self.mode == FIXED:
            return unit.weight + unit.delta if self._keep[unit.index] else unit.weight
        gate = self._gates[unit.index] if self._gates is not None else self.projected()[unit.index]
        return unit.weight + gate.to(unit.delta.dtype) * unit.delta

    # --- the phases -----------------------------------------------------------------------------
    def search(self) -> None:
        self.mode = SEARCH
        self.trainable(policy=True, deltas=[True] * len(self.names))

    def off(self) -> None:
        """No dW (a phase before the search, such as a warm-up): nothing of SWR trains."""
        self.mode = OFF
        self.trainable(policy=False, deltas=[False] * len(self.names))

    def fix(self) -> None:
        """End the search (once: a resumed run keeps the saved choice): the projected units stay,
        the others' dW are zeroed and frozen, and the policy stops training."""
        if float(self.chosen.min()) < 0:
            self.chosen.copy_(self.projected())
            with torch.no_grad():
                for (_, _, module), keep in zip(self._units, self.chosen.tolist()):
                    if not keep:
                        module.delta.zero_()
        self.mode = FIXED
        self._keep = [bool(k) for k in self.chosen.tolist()]  # read by every forward: no tensor lookups
        self.trainable(policy=False, deltas=self._keep)

    def trainable(self, policy: bool, deltas: list[bool]) -> None:
        # a parameter without a gradient is skipped by the optimizer (no decay, no stale momentum)
        self.policy.requires_grad_(policy)
        for (_, _, module), on in zip(self._units, deltas):
            module.delta.requires_grad_(on)

    def choice(self) -> torch.Tensor:
        return self.chosen if float(self.chosen.min()) >= 0 else self.projected()

    def merge(self) -> None:
        """Merge the chosen units into plain Linear modules (after which this module does nothing)."""
        for (parent, attr, module), keep in zip(self._units, self.choice().tolist()):
            setattr(parent, attr, module.merged(bool(keep)))
        object.__setattr__(self, "_units", [])
        self.mode = OFF

    def report(self) -> dict:
        """Which units the policy chose, and what they hold against the budget."""
        keep = self.choice().tolist()
        probs = self.probabilities().tolist()
        updated = int(sum(s for s, k in zip(self.sizes.tolist(), keep) if k))
        return {"units": [n for n, k in zip(self.names, keep) if k], "candidates": len(self.names),
                "updated_weights": updated, "budget_weights": self.budget, "backbone_weights": self.total,
                "final": float(self.chosen.min()) >= 0,
                "probabilities": {n: round(p, 4) for n, p in zip(self.names, probs)}}


def candidate_units(layers, first: int, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, str, int]]:
    """(parent, attribute, name, layer index) of each Linear in LAYERS (numbered from FIRST) whose
    name ends in one of the family's LoRA TARGETS."""
    found = []
    for offset, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            found.append((parent, attr, f"layer.{first + offset}.{name}", first + offset))
    return found


def layer_weights(layer, targets: tuple[str, ...]) -> int:
    """The weights of one layer's candidate units (every layer of a family has the same)."""
    return sum(getattr(p, a).weight.numel() for p, a, _, _ in candidate_units([layer], 0, targets))


def describe(units: list, num_layers: int, sizes: torch.Tensor) -> torch.Tensor:
    """What the policy sees of each unit: its depth in the backbone (0 to 1), its kind (one-hot of
    its name within the layer), and its size against the largest unit's."""
    kinds = sorted({name.split(".", 2)[2] for _, _, name, _ in units})
    rows = []
    for (_, _, name, layer), size in zip(units, sizes.tolist()):
        kind = [0.0] * len(kinds)
        kind[kinds.index(name.split(".", 2)[2])] = 1.0
        rows.append([layer / max(num_layers - 1, 1), *kind, size / float(sizes.max())])
    return torch.tensor(rows)


def logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))
