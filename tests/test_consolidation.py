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


def per_tier_reference(module: Consolidation, states, mask):
    """The module's formula with one projection call per tier and the redundancy as a matmul of
    unit vectors (the straightforward form the grouped implementation must equal)."""
    keep = mask.bool().unsqueeze(-1)
    states = {t: states[t].float().masked_fill(~keep, 0.0) for t in module.inputs}
    guide = module.project[str(module.anchor)](states[module.anchor])
    others = torch.stack([module.project[str(t)](states[t]) for t in module.tiers], dim=-2)
    unit = others / others.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    redundancy = torch.relu(unit @ unit.transpose(-1, -2)).sum(-1)
    alpha = torch.relu(module.score(others * guide.unsqueeze(-2)).squeeze(-1)) / redundancy.clamp_min(1e-6)
    alpha = alpha / alpha.sum(-1, keepdim=True).clamp_min(1e-6)
    z = (alpha.unsqueeze(-1) * others).sum(-2) + guide
    y = module.norm(module.up(torch.relu(z))) + torch.tanh(module.gate / 0.1) * states[module.anchor]
    return y.masked_fill(~keep, 0.0)


def test_grouped_projections_equal_one_call_per_tier():
    """Forward and every parameter's gradient, both projections, float32 and float16 inputs (the
    cache hands out float16; the module converts while copying), with an open gate."""
    states, mask = states_and_mask()
    for projection in ("gated-mlp", "linear-ln"):
        for dtype in (torch.float32, torch.float16):
            module = make(projection).train()  # dropout 0: train mode is deterministic
            with torch.no_grad():
                module.gate.fill_(0.03)
                for t in module.inputs:  # distinct LayerNorm scales per tier (init has them all 1)
                    for p in module.project[str(t)].parameters():
                        p.add_(0.1 * torch.randn_like(p))
            feed = {t: v.to(dtype) for t, v in states.items()}
            grads = []
            for fn in (module, lambda s, m: per_tier_reference(module, s, m)):
                module.zero_grad()
                out = fn(feed, mask)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                grads.append((out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}))
            torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
            for name, g in grads[1][1].items():
                torch.testing.assert_close(grads[0][1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_inputs_that_need_gradients_get_them():
    """A caller differentiating through the tiers (not stage two, whose tiers are data) gets gradients
    equal to the reference's."""
    states, mask = states_and_mask()
    module = make()
    a = {t: v.clone().requires_grad_() for t, v in states.items()}
    b = {t: v.clone().requires_grad_() for t, v in states.items()}
    module(a, mask).sum().backward()
    per_tier_reference(module, b, mask).sum().backward()
    for t in module.inputs:
        torch.testing.assert_close(a[t].grad, b[t].grad, rtol=1e-5, atol=1e-6)
        assert torch.all(a[t].grad[mask == 0] == 0)


def test_tier_weights_match_the_reference_alpha():
    states, mask = states_and_mask()
    module = make()
    with torch.no_grad():
        a = {k: module.project[str(k)](states[k].masked_fill(~mask.bool().unsqueeze(-1), 0.0)) for k in range(4)}
        expect = anti_redundancy_weights(torch.stack([a[0], a[1], a[2]], dim=-2), a[3], module.score)
        torch.testing.assert_close(module.tier_weights(states, mask), expect)
