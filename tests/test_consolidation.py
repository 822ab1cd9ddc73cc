"""The consolidation module (DESIGN.md section 2): shapes, anti-redundancy weights, the gate."""

import math

import torch
from torch import nn

from sherl_pipe.consolidation import Consolidation, anti_redundancy_weights


def make(projection="gated-mlp", tiers=(0, 1, 2), anchor=3, width=32, reduction=4):
    torch.manual_seed(0)
    return Consolidation(width, list(tiers), anchor, reduction, projection, post_ln=True, dropout=0.0).eval()


def states_and_mask(width=32, b=3, t=5):
    torch.manual_seed(1)
    states = {k: torch.randn(b, t, width) for k in range(4)}
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4])
    return states, mask


def test_shapes_and_padding_for_both_projections():
    states, mask = states_and_mask()
    for projection in ("gated-mlp", "linear-ln"):
        module = make(projection)
        out = module(states, mask)
        assert out.shape == (3, 5, 32)
        assert torch.all(out[mask == 0] == 0)
        assert module.project["0"].down.out_features == 8  # d = D / r
        assert module.inputs == [0, 1, 2, 3]


def test_redundancy_weights_hand_computed():
    # Two tiers of S in d = 2: a1 = (1, 0), a2 = (1, 1); guide g = (1, 2); score w = (1, 1), b = 0.
    others = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    guide = torch.tensor([1.0, 2.0])
    score = nn.Linear(2, 1)
    with torch.no_grad():
        score.weight.copy_(torch.tensor([[1.0, 1.0]]))
        score.bias.zero_()
    cos12 = 1 / math.sqrt(2)
    r1, r2 = 1 + cos12, cos12 + 1  # self included
    s1, s2 = 1 * 1 + 0 * 2, 1 * 1 + 1 * 2  # w . (a_t * g) = 1, 3
    raw = torch.tensor([s1 / r1, s2 / r2])
    expect = raw / raw.sum()
    got = anti_redundancy_weights(others, guide, score)
    torch.testing.assert_close(got, expect)
    # Negative scores get no weight; all scores <= 0 give all-zero weights.
    with torch.no_grad():
        score.bias.fill_(-2.0)  # scores -1, 1
    torch.testing.assert_close(anti_redundancy_weights(others, guide, score), torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        score.bias.fill_(-10.0)
    assert torch.all(anti_redundancy_weights(others, guide, score) == 0)
    # A zero tier (cos undefined) is clamped, not NaN.
    zero = torch.zeros(2, 2)
    assert torch.isfinite(anti_redundancy_weights(zero, guide, score)).all()


def test_gate_is_shut_at_init_and_opens_with_gamma():
    states, mask = states_and_mask()
    module = make()
    base = module(states, mask)
    shifted = dict(states)
    shifted[3] = states[3].clone()
    # The anchor also feeds the guide, so compare against the module with the residual removed by hand.
    with torch.no_grad():
        a = {k: module.project[str(k)](states[k]) for k in range(4)}
        others = torch.stack([a[0], a[1], a[2]], dim=-2)
        alpha = anti_redundancy_weights(others, a[3], module.score)
        z = (alpha.unsqueeze(-1) * others).sum(-2) + a[3]
        expect = module.norm(module.up(torch.relu(z))) * mask.unsqueeze(-1)
    torch.testing.assert_close(base, expect)  # tanh(0 / T) = 0: no anchor residual
    with torch.no_grad():
        module.gate.fill_(0.05)
    opened = module(states, mask)
    torch.testing.assert_close(opened, expect + math.tanh(0.5) * states[3] * mask.unsqueeze(-1))


def test_only_the_anchor():
    states, mask = states_and_mask()
    module = make(tiers=())
    assert module.tiers == [] and module(states, mask).shape == (3, 5, 32)
