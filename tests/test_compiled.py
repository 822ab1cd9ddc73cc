"""train.compile: the compiled consolidation equals the eager one, and a compiler failure falls back."""

import pytest
import torch

from sherl_pipe import compiled
from sherl_pipe.compiled import CompiledOrEager
from sherl_pipe.consolidation import Consolidation


def module_and_batch():
    torch.manual_seed(0)
    module = Consolidation(32, [0, 1, 2], 3, 4, "gated-mlp", post_ln=True, dropout=0.0).train()
    with torch.no_grad():
        module.gate.fill_(0.02)
    states = {k: torch.randn(3, 5, 32).half() for k in range(4)}
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4])
    return module, states, mask


def outputs_and_grads(fn, module, states, mask):
    module.zero_grad()
    out = fn(states, mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.slow
def test_compiled_consolidation_equals_eager():
    module, states, mask = module_and_batch()
    said = []
    eager = outputs_and_grads(module, module, states, mask)
    got = outputs_and_grads(CompiledOrEager(module, said.append, "consolidation"), module, states, mask)
    assert said == []  # it did compile
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    for name, g in eager[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def fails_at_first_call(module, **kwargs):
    def run(*args, **kw):
        raise RuntimeError("no C++ compiler found\ndetails")
    return run


def refuses_to_compile(module, **kwargs):
    raise RuntimeError("no C++ compiler found\ndetails")


@pytest.mark.parametrize("broken", [fails_at_first_call, refuses_to_compile])
def test_a_compiler_failure_falls_back_to_eager_once(monkeypatch, broken):
    monkeypatch.setattr(compiled.torch, "compile", broken)
    module, states, mask = module_and_batch()
    said = []
    wrapped = CompiledOrEager(module, said.append, "consolidation")
    eager = outputs_and_grads(module, module, states, mask)
    for _ in range(2):
        got = outputs_and_grads(wrapped, module, states, mask)
        torch.testing.assert_close(got[0], eager[0])
    assert len(said) == 1 and "RuntimeError: no C++ compiler found" in said[0] and "eagerly" in said[0]


def test_train_compile_runs_the_same_training_and_keeps_the_checkpoint_layout(
        tmp_path, monkeypatch, bert_dir, labeled_csv, fp32_cache):
    """train.compile wires CompiledOrEager into training steps; with the compiler failing (the
    fallback path, fast to test) the run says so once and its weights equal an uncompiled run's."""
    from safetensors.torch import load_file
    from train_helpers import pipeline_for

    from sherl_pipe.training import train

    monkeypatch.setattr(compiled.torch, "compile", fails_at_first_call)
    weights, said = {}, []
    for flag in ("false", "true"):
        pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / flag,
                            f'max_steps = 6\neval_split = ""\ncompile = {flag}\n')
        train(pipe, log=said.append)
        weights[flag] = load_file(tmp_path / flag / "checkpoints" / "last.safetensors")
    assert sum("the compiled consolidation could not run" in m for m in said) == 1
    assert weights["true"].keys() == weights["false"].keys()
    for key, value in weights["false"].items():
        assert torch.equal(weights["true"][key], value), key
