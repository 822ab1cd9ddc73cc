"""compare's memory figures: the training state's bytes count each storage once, the weights under
parameters only (autograd saves a Linear's weight for its input's gradient; it is not an activation)."""

from __future__ import annotations

import torch

from sherl_pipe.compare.measure import state_bytes


def test_weights_saved_for_backward_are_not_counted_as_activations():
    """A 3-layer MLP, 512 wide, batch 4: its real activations are about 40 KB; the old count put the
    second and third layers' weights among them (1,077,248 bytes, 1,052,672 of them weights)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 2))
    x = torch.randn(4, 512)
    got = state_bytes(model, lambda: model(x).square().sum())
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert got["parameters"] == weights
    assert 4 * 512 * 4 <= got["activations"] <= 64 * 1024, got  # inputs and ReLU outputs of 4 x 512
    assert got["total"] == got["parameters"] + got["gradients"] + got["optimizer"] + got["activations"]


def test_frozen_weights_and_buffers_saved_for_backward_count_once():
    """A frozen layer in front of a trained head still saves its weight for the input's gradient:
    that weight is a parameter, counted once."""
    frozen = torch.nn.Linear(256, 256)
    frozen.requires_grad_(False)
    norm = torch.nn.BatchNorm1d(256)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), frozen, norm, torch.nn.Linear(256, 3))
    got = state_bytes(model, lambda: model(torch.randn(8, 256)).sum())
    assert got["activations"] <= 8 * 256 * 4 * 6, got
