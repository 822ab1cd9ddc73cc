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
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tier_weights"] is None
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
