"""A method of one's own, defined in a test module as a user would (registered from code in
tests/methods and tests/compare; a compare job imports it as toy_method:Toy)."""

from __future__ import annotations

from torch import nn

from sherl_pipe.methods.base import Method
from sherl_pipe.model import Head, pool


class Toy(Method):
    """A toy method from a test file: the mean of h[1] and h[L] through a module named nothing like
    the built-in ones (its parameters must still train at the new-module rate, without decay)."""

    name = "toy"
    lr = 2e-3

    def reads(self, spec):
        return [1, spec.num_layers]

    def build(self, spec, config, modules):
        return ToyModel(spec, config)


class ToyModel(nn.Module):
    def __init__(self, spec, config):
        super().__init__()
        self.spec, self.config = spec, config
        self.blend = nn.Linear(config.hidden_size, config.hidden_size)
        self.head = Head(config.hidden_size, spec.num_outputs, 0.0)

    def forward_batch(self, batch):
        mixed = self.blend((batch.states[1].float() + batch.states[self.spec.num_layers].float()) / 2)
        return self.head(pool(mixed, batch.mask, "mean", None))

    def new_modules(self):
        return [self.blend, self.head]
