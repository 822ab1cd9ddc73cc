"""The consolidation module (DESIGN.md section 2): shapes, anti-redundancy weights, the gate."""

import math

import pytest
import torch
from torch import nn

from sherl_pipe.consolidation import TIER_SCORES, Consolidation, anti_redundancy_weights


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


@pytest.mark.parametrize("post_ln", [True, False])
def test_an_open_start_passes_the_anchor_and_learns_a_correction(post_ln):
    """train.anchor_residual = "open": at init the output is tanh(3) h[c] (the late layers start on
    the pretrained path), and a step moves the module's own output away from zero."""
    states, mask = states_and_mask()
    torch.manual_seed(0)
    module = Consolidation(32, [0, 1, 2], 3, 4, post_ln=post_ln, dropout=0.0, anchor_residual="open")
    out = module(states, mask)
    torch.testing.assert_close(out, math.tanh(3.0) * states[3] * mask.unsqueeze(-1))
    out.pow(2).sum().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert (module(states, mask) - math.tanh(module.gate / 0.1) * states[3] * mask.unsqueeze(-1)).abs().max() > 1e-3


def test_the_config_offers_every_anchor_residual():
    from sherl_pipe.consolidation import ANCHOR_RESIDUALS
    from sherl_pipe.methods.sherl import SherlOptions  # SHERL's own settings

    assert set(SherlOptions.__dataclass_fields__["anchor_residual"].metadata["choices"]) == set(ANCHOR_RESIDUALS)


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


def naive_alpha(others: torch.Tensor, guide: torch.Tensor, score: nn.Linear, name: str) -> torch.Tensor:
    """alpha of every option, token by token and tier by tier, from its formula (docs/methods.md):
    x_t = a_t * g (divided by sqrt(mean(x_t^2) + eps) where normalised), s_t = w . x_t + b,
    R_t = sum_j relu(cos(a_t, a_j)), alpha_t = f(s_t) / R_t normalised to sum 1 (0 if all are 0),
    f = relu | softplus = log(1 + e^s) | exp."""
    from sherl_pipe.consolidation import TIER_SCORES

    form = TIER_SCORES[name]
    f = {"relu": lambda s: max(s, 0.0), "softplus": lambda s: math.log1p(math.exp(s)), "exp": math.exp}[form.activation]
    w, b = score.weight[0].detach().tolist(), float(score.bias.detach())
    out = torch.zeros(others.shape[:-1], dtype=torch.float64)
    for token in range(others.shape[0]):
        a, g = others[token].double().tolist(), guide[token].double().tolist()
        raw = []
        for t, a_t in enumerate(a):
            x = [u * v for u, v in zip(a_t, g)]
            if form.normalised:
                rms = math.sqrt(sum(v * v for v in x) / len(x) + 1e-6)
                x = [v / rms for v in x]
            s = sum(wi * xi for wi, xi in zip(w, x)) + b
            norm_t = math.sqrt(sum(v * v for v in a_t))
            r = sum(max(0.0, sum(u * v for u, v in zip(a_t, a_j)) / (norm_t * math.sqrt(sum(v * v for v in a_j))))
                    for a_j in a)
            raw.append(f(s) / r)
        total = sum(raw)
        out[token] = torch.tensor([x / total if total > 0 else 0.0 for x in raw], dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", list(TIER_SCORES))
def test_every_tier_score_gives_its_formulas_alpha(name):
    """Non-negative, summing to 1 per token (relu: 0 where every score is <= 0), and equal to a
    naive token-by-token computation of the option's formula; with biases that make relu's scores
    all positive, all negative, and mixed."""
    torch.manual_seed(3)
    others, guide = torch.randn(40, 3, 8), torch.randn(40, 8)
    module = Consolidation(32, [0, 1, 2], 3, 4, tier_score=name)
    for bias in (-60.0, -2.0, 60.0):
        with torch.no_grad():
            module.score.weight.normal_()
            module.score.bias.fill_(bias)
        alpha = anti_redundancy_weights(others, guide, module.score, module.form)
        torch.testing.assert_close(alpha.double(), naive_alpha(others, guide, module.score, name), rtol=1e-4, atol=1e-6)
        assert torch.all(alpha >= 0)
        sums = alpha.sum(-1)
        any_positive = (module.score(others * guide.unsqueeze(1)).squeeze(-1) > 0).any(-1)
        if TIER_SCORES[name].activation == "relu" and not TIER_SCORES[name].normalised:
            torch.testing.assert_close(sums, any_positive.float())  # 1 with a positive score, else 0
        elif TIER_SCORES[name].activation != "relu":
            torch.testing.assert_close(sums, torch.ones(40))  # no dead zone: always 1
        else:
            assert set(torch.round(sums, decimals=5).tolist()) <= {0.0, 1.0}
        if TIER_SCORES[name].activation == "relu":  # the checks above saw dead, mixed and alive tokens
            assert {-60.0: (sums == 0).all(), -2.0: (sums == 0).any() and (sums > 0).any(), 60.0: (sums > 0).all()}[bias]


def test_the_paper_form_keeps_pytorchs_default_init_and_the_others_set_their_bias():
    """relu is the paper's form with the default Linear init (bias uniform in +-1/sqrt(d)); a form with a
    bias sets it after the default init, so every other weight starts as the paper form's does."""
    torch.manual_seed(0)
    paper = Consolidation(32, [0, 1, 2], 3, 4, tier_score="relu")
    for name, form in TIER_SCORES.items():
        torch.manual_seed(0)
        other = Consolidation(32, [0, 1, 2], 3, 4, tier_score=name)
        assert other.score.bias.item() == (paper.score.bias.item() if form.bias is None else form.bias)
        for (n, p), q in zip(paper.named_parameters(), other.parameters()):
            assert n == "score.bias" or torch.equal(p, q), n


class Observed:
    def __init__(self, states, mask):
        self.states, self.mask = states, mask


def identity_consolidation() -> Consolidation:
    """Width 2, d = 2, gated-mlp projections that pass positive inputs through unchanged
    (u = relu(I h), a = (0 u + u) * sigmoid(40) = u), score w = (1, 1), b = -1."""
    module = Consolidation(2, [0, 1], 2, 1, "gated-mlp", dropout=0.0, tier_score="relu").eval()
    with torch.no_grad():
        for t in ("0", "1", "2"):
            p = module.project[t]
            p.down.weight.copy_(torch.eye(2)), p.down.bias.zero_()
            p.mix.weight.zero_(), p.mix.bias.zero_()
            p.gate.weight.zero_(), p.gate.bias.fill_(40.0)
        module.score.weight.fill_(1.0), module.score.bias.fill_(-1.0)
    return module


def test_the_alive_share_and_alpha_sum_are_exact_on_known_scores():
    """Tiers h0 = (1, 0) and h1 = (0, 1) are orthogonal (R = 1 each), so with g = (x, y) the scores are
    s = (x - 1, y - 1). Tokens: g = (3, 0.5): s = (2, -0.5), alpha (1, 0); g = (0.5, 0.5): every score
    < 0, dead; g = (2, 3): s = (1, 2), alpha (1/3, 2/3); a padded position (not counted). Over the
    second batch's two tokens: g = (1, 1): s = (0, 0), dead (a score of 0 is not positive); (5, 1): (1, 0)."""
    from sherl_pipe.training.tier_weights import ConsolidationMeter

    module = identity_consolidation()
    meter = ConsolidationMeter(module)
    h0, h1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

    def batch(guides, mask):
        g = torch.tensor(guides).unsqueeze(0)
        n = g.shape[1]
        return Observed({0: h0.expand(1, n, 2), 1: h1.expand(1, n, 2), 2: g}, torch.tensor([mask]))

    meter.observe(batch([[3.0, 0.5], [0.5, 0.5], [2.0, 3.0], [9.0, 9.0]], [1, 1, 1, 0]))
    meter.observe(batch([[1.0, 1.0], [5.0, 1.0]], [1, 1]))
    got = meter.result("a test")
    assert got["tokens"] == 5 and got["alive"] == pytest.approx(3 / 5, abs=1e-6)
    assert got["alpha"] == pytest.approx({"h0": (1 + 1 / 3 + 1) / 5, "h1": (2 / 3) / 5}, abs=1e-6)
    assert got["alpha_sum"] == pytest.approx(3 / 5, abs=1e-6)  # each alive token's alpha sum to 1
    # entropy over the alive tokens: alpha (1, 0), (1/3, 2/3), (1, 0), in units of log 2
    assert got["entropy"] == pytest.approx((math.log(3) - 2 / 3 * math.log(2)) / math.log(2) / 3, abs=1e-6)
    # sd across the 5 tokens: h0 takes 1, 0, 1/3, 0, 1; h1 takes 0, 0, 2/3, 0, 0
    sd = [torch.tensor(v).std(unbiased=False).item() for v in ([1, 0, 1 / 3, 0, 1], [0, 0, 2 / 3, 0, 0])]
    assert got["token_sd"] == pytest.approx(sum(sd) / 2, abs=1e-6)
    assert got["gate"] == 0.0 and got["anchor"] == "h2" and got["on"] == "a test"


def test_the_dead_warning_fires_on_a_dead_consolidation_only():
    from sherl_pipe.training.tier_weights import ConsolidationMeter, dead_warning

    states, mask = states_and_mask()
    for bias, dead in ((-50.0, True), (50.0, False)):
        module = make()
        with torch.no_grad():
            module.score.bias.fill_(bias)
        meter = ConsolidationMeter(module)
        meter.observe(Observed(states, mask))
        state = meter.result("validation split")
        assert state["alive"] == (0.0 if dead else 1.0)
        warning = dead_warning(state, "relu")
        assert (warning is not None) == dead
    assert warning is None
    state["alive"], state["alpha_sum"] = 0.049, 0.049
    warning = dead_warning(state, "relu")
    assert warning.startswith("warning: the consolidation is dead: its tiers are alive on 4.9% of the tokens")
    assert "h0, h1, h2 are unused" in warning and "train.tier_score" in warning and "\n" not in warning


def test_only_the_paper_form_has_a_dead_zone():
    """With every score far below 0 (bias -200), relu passes no gradient to the score, so such a
    consolidation can never come back; the other forms still weigh the tiers (alpha summing to 1)
    and their score weight still gets a gradient; nothing is NaN."""
    states, mask = states_and_mask()
    for name, form in TIER_SCORES.items():
        module = make()
        module.form = form
        with torch.no_grad():
            module.score.bias.fill_(-200.0)
        module.zero_grad()
        (module(states, mask) * torch.linspace(-1, 1, 3 * 5 * 32).view(3, 5, 32)).sum().backward()
        grad = module.score.weight.grad
        assert torch.isfinite(grad).all(), name
        alpha_sum = module.tier_weights(states, mask).sum(-1)[mask.bool()]
        if form.activation == "relu":
            assert float(grad.abs().max()) == 0.0 and torch.all(alpha_sum == 0), name
        else:
            assert float(grad.abs().max()) > 0.0, name
            torch.testing.assert_close(alpha_sum, torch.ones_like(alpha_sum), msg=name)


def test_the_config_offers_every_tier_score():
    from sherl_pipe.methods.sherl import SherlOptions  # SHERL's own settings

    assert set(SherlOptions.__dataclass_fields__["tier_score"].metadata["choices"]) == set(TIER_SCORES)
