"""After training, summary.json and `sherl-pipe info RUN` report which tiers the consolidation
leans on: the mean alpha per tier over the training split's real tokens, and the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_full_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.evaluation import load_trained
from sherl_pipe.training import train


def test_summary_holds_the_mean_alpha_of_every_tier_over_the_training_tokens(tmp_path, bert_dir, labeled_csv,
                                                                              fp32_cache):
    pipe = load_pipeline(str(write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache,
                                                 tmp_path / "run", 'dtype = "float32"', "max_steps = 6")))
    train(pipe, log=lambda m: None)
    weights = json.loads((tmp_path / "run" / "summary.json").read_text())["tier_weights"]
    assert list(weights["alpha"]) == ["h0", "h1"] and weights["anchor"] == "h2"

    # the same mean computed independently: the whole split at once, straight from the Zarr arrays
    cache = Cache(fp32_cache)
    lengths = cache.array("train", "lengths")[:]
    states = {t: torch.from_numpy(cache.array("train", f"h{t}")[:]).float() for t in (0, 1, 2)}
    mask = torch.from_numpy(np.arange(states[0].shape[1])[None, :] < lengths[:, None]).long()
    model = load_trained(tmp_path / "run", "last").model
    with torch.no_grad():
        alpha = model.consolidation.tier_weights(states, mask)[mask.bool()]
    assert weights["tokens"] == int(lengths.sum())
    np.testing.assert_allclose(list(weights["alpha"].values()), alpha.mean(0).double().numpy(), atol=1e-5)
    assert 0.0 < sum(weights["alpha"].values()) <= 1.0 + 1e-6  # each token's alpha sums to 1 (or 0)
    assert weights["gate"] == round(float(torch.tanh(model.consolidation.gate.detach() / 0.1)), 6)

    shown = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert shown.exit_code == 0, shown.output
    assert "tier weights (mean alpha over" in shown.output and "h0 " in shown.output and "gate" in shown.output
    # the training line reads as text, not as Python's reprs of the summary
    assert "precision auto (fp32)" in shown.output and "6 steps, 0 epochs, max-steps; best accuracy " in shown.output
    assert "None" not in shown.output and "{" not in shown.output
    as_json = json.loads(CliRunner().invoke(main, ["info", "--json", str(tmp_path / "run")]).output)
    assert as_json["summary"]["tier_weights"] == weights


@pytest.mark.parametrize("mode", ["full-finetune", "live"])
def test_full_finetuning_and_live_runs_have_no_tier_weights(tmp_path, bert_dir, labeled_csv, fp32_cache, mode):
    pipe = load_pipeline(str(write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache,
                                                 tmp_path / "run", 'dtype = "float32"',
                                                 f'mode = "{mode}"\nmax_steps = 2')))
    train(pipe, log=lambda m: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tier_weights"] is None
    # the per-epoch state is measured in live runs too (on the early layers' live output), not in full fine-tuning
    assert (summary["consolidation"] is None) == (mode == "full-finetune")
    shown = CliRunner().invoke(main, ["info", str(tmp_path / "run")])
    assert "tier weights: none" in shown.output


def test_an_interrupted_tier_measurement_keeps_the_summary(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                           monkeypatch):
    import pytest as _pytest

    import sherl_pipe.training.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "measure_tier_weights", interrupted)
    pipe = load_pipeline(str(write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache,
                                                 tmp_path / "run", 'dtype = "float32"', "max_steps = 2")))
    with _pytest.raises(KeyboardInterrupt):
        train(pipe, log=lambda m: None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tier_weights"] is None
    assert train(pipe, resume=True, log=lambda m: None).steps == 2  # finished: nothing to redo


def validation_state(run_dir, cache_dir, split="validation", samples=None):
    """The consolidation's state on a split, computed independently: the whole split at once, straight
    from the Zarr arrays, with the run's last weights."""
    cache = Cache(cache_dir)
    lengths = cache.array(split, "lengths")[:]
    picked = np.arange(len(lengths)) if samples is None else samples
    states = {t: torch.from_numpy(cache.array(split, f"h{t}")[:][picked]).float() for t in (0, 1, 2)}
    mask = torch.from_numpy(np.arange(states[0].shape[1])[None, :] < lengths[picked][:, None]).long()
    model = load_trained(run_dir, "last").model
    with torch.no_grad():
        alpha = model.consolidation.tier_weights(states, mask)[mask.bool()].double()
    live = alpha[alpha.sum(-1) > 0]
    p = (live / live.sum(-1, keepdim=True)).numpy()
    entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1) / np.log(p.shape[-1])
    return {"alive": float((alpha.sum(-1) > 0).double().mean()), "alpha": alpha.mean(0).numpy(),
            "entropy": float(entropy.mean()), "token_sd": float(alpha.std(0, unbiased=False).mean()),
            "tokens": int(lengths[picked].sum())}


def test_each_epoch_records_the_consolidations_state_on_the_evaluation_split(tmp_path, bert_dir, labeled_csv,
                                                                             fp32_cache):
    """At the default tier score (softmax-normed) every token has positive weights by construction, so
    no alive share is reported (it read 100% whatever was learned; the old test asserted exactly
    that); how far the weights are from uniform and how much they vary across tokens is, and equals
    an independent computation over the whole split."""
    lines = []
    pipe = load_pipeline(str(write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache,
                                                 tmp_path / "run", 'dtype = "float32"',
                                                 'eval_split = "validation"\nepochs = 2')))
    train(pipe, log=lines.append)
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(r["consolidation"]["on"] == "validation split" for r in epochs)
    last = epochs[-1]["consolidation"]
    want = validation_state(tmp_path / "run", fp32_cache)
    assert last["tokens"] == want["tokens"] and last["alive"] is None and pipe.train.tier_score == "softmax-normed"
    np.testing.assert_allclose(list(last["alpha"].values()), want["alpha"], atol=1e-5)
    assert last["entropy"] == pytest.approx(want["entropy"], abs=1e-5) and 0 < last["entropy"] <= 1
    assert last["token_sd"] == pytest.approx(want["token_sd"], abs=1e-5) and last["token_sd"] > 0
    assert last["alpha_sum"] == pytest.approx(sum(last["alpha"].values()), abs=1e-5)
    assert last["alpha_sum"] == pytest.approx(1.0) and last["anchor"] == "h2"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["consolidation"] == last
    # over the training split after training: the entropy and spread beside the mean alpha
    assert 0 < summary["tier_weights"]["entropy"] <= 1 and summary["tier_weights"]["alive"] is None
    epoch_lines = [x for x in lines if x.startswith("epoch ")]
    part = f"entropy {last['entropy']:.3f} of uniform, sd across tokens {last['token_sd']:.3f}"
    assert len(epoch_lines) == 2 and part in epoch_lines[-1] and "alive" not in epoch_lines[-1]
    shown = CliRunner().invoke(main, ["info", str(tmp_path / "run")]).output
    assert (f"consolidation (tier score {pipe.train.tier_score}; last epoch, {last['tokens']} tokens of validation "
            f"split): alpha sum 1.000; {part}" in shown) and "mean alpha h0 " in shown


def test_without_an_evaluation_split_a_fixed_sample_of_training_tokens_is_measured(tmp_path, bert_dir, labeled_csv,
                                                                                 fp32_cache):
    pipe = load_pipeline(str(write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache,
                                                 tmp_path / "run", 'dtype = "float32"', 'eval_split = ""\nepochs = 1')))
    train(pipe, log=lambda m: None)
    state = json.loads((tmp_path / "run" / "summary.json").read_text())["consolidation"]
    assert state["on"] == "a fixed sample of the train split"
    # 120 training samples in chunks of 16: 8 chunks, of which 0, 2, 5 and 7 (evenly spread) are the sample
    samples = np.concatenate([np.arange(c * 16, min(c * 16 + 16, 120)) for c in (0, 2, 5, 7)])
    want = validation_state(tmp_path / "run", fp32_cache, "train", samples)
    assert state["tokens"] == want["tokens"] and state["entropy"] == pytest.approx(want["entropy"], abs=1e-5)
    np.testing.assert_allclose(list(state["alpha"].values()), want["alpha"], atol=1e-5)


@pytest.mark.parametrize("bias, dead", [(-100.0, True), (100.0, False)])
def test_a_dead_consolidation_is_warned_about_at_the_end_of_training(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                                    monkeypatch, bias, dead):
    """A score bias of -100 puts every relu score below 0 for good (no gradient reaches it): the run
    ends with one warning line, and `info RUN` repeats it; a bias of +100 keeps every token alive."""
    from sherl_pipe.consolidation import TIER_SCORES, TierScore

    monkeypatch.setitem(TIER_SCORES, "relu", TierScore("relu", bias=bias))
    lines = []
    pipe = load_pipeline(str(write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache,
                                                 tmp_path / "run", 'dtype = "float32"',
                                                 'eval_split = "validation"\nmax_steps = 4\ntier_score = "relu"')))
    train(pipe, log=lines.append)
    warnings = [x for x in lines if "consolidation is dead" in x]
    state = json.loads((tmp_path / "run" / "summary.json").read_text())["consolidation"]
    assert state["alive"] == (0.0 if dead else 1.0) and len(warnings) == int(dead)
    shown = CliRunner().invoke(main, ["info", str(tmp_path / "run")]).output
    if dead:
        assert warnings[0].startswith("warning: the consolidation is dead: its tiers are alive on 0.0% of the tokens "
                                      "of validation split (alpha sum 0.000), so the cached tiers h0, h1 are unused")
        assert warnings[0] in shown
    else:
        assert "warning" not in shown
