"""FastDropout (sherl_pipe/dropout.py): nn.Dropout's behaviour with cheaper masks on CPU."""

import math

import torch
from torch import nn

from sherl_pipe.dropout import LEVELS, FastDropout, fast_dropout, use_fast_dropout


def test_drop_rate_and_scale_are_those_of_p():
    torch.manual_seed(0)
    n, p = 1_000_000, 0.1
    y = fast_dropout(torch.ones(n), p)
    q = round(p * LEVELS) / LEVELS  # the drop probability after 16-bit rounding
    dropped = float((y == 0).float().mean())
    assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / n)  # 5 binomial standard deviations
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - q)))  # E[y] = x exactly


def test_masks_follow_the_seed_and_change_between_calls():
    x = torch.randn(64, 48)
    torch.manual_seed(3)
    a, b = fast_dropout(x, 0.3), fast_dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, 0.3), a)
    assert not torch.equal(a, b)


def test_gradient_is_the_mask_times_the_scale():
    x = torch.randn(32, 16, requires_grad=True)
    y = fast_dropout(x, 0.25)
    y.sum().backward()
    keep = y.detach() != 0
    torch.testing.assert_close(x.grad, keep.float() / (1 - round(0.25 * LEVELS) / LEVELS))


def test_module_is_a_dropout_with_the_same_p_and_modes():
    drop = FastDropout(0.2)
    assert isinstance(drop, nn.Dropout) and drop.p == 0.2
    x = torch.randn(10, 10)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_every_plain_dropout_of_a_layer_is_replaced():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        hidden_dropout_prob=0.15, attention_probs_dropout_prob=0.05)
    layer = use_fast_dropout(BertLayer(config))
    drops = [m for m in layer.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is FastDropout for m in drops)
    assert sorted({m.p for m in drops}) == [0.05, 0.15]  # attention reads its module's p
