"""Barlow Twins (redundancy.py) as SHERL's regulariser: the objective as the official code computes
it, and `train.redundancy = "barlow"` as a loss term of the run."""

from __future__ import annotations

import json

import pytest
import torch

from sherl_pipe.redundancy import LAMBDA, barlow_twins
from sherl_pipe.training import train
from test_methods import full_cache, pipeline  # noqa: F401 (full_cache: the module's fixture)


def official(z1: torch.Tensor, z2: torch.Tensor, lam: float) -> torch.Tensor:
    """facebookresearch/barlowtwins main.py: bn = BatchNorm1d(affine=False); c = bn(z1).T @ bn(z2)
    / batch; on_diag + lambd * off_diag (here divided by D, as sherl-pipe's is)."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False)
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c.flatten()[:-1].view(c.shape[0] - 1, c.shape[0] + 1)[:, 1:]).pow(2).sum()
    return (on + lam * off) / z1.shape[1]


def test_the_objective_is_the_official_codes():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 24, generator=g), torch.randn(32, 24, generator=g)
    torch.testing.assert_close(barlow_twins(z1, z2), official(z1, z2, LAMBDA), atol=1e-5, rtol=1e-5)
    same = barlow_twins(z1, z1)  # the same view twice: the diagonal is 1, only redundancy is left
    assert 0 < float(same) < float(barlow_twins(z1, z2)) and float(barlow_twins(z1, -z1)) > 3.9  # C_ii = -1
    one = torch.randn(1, 24, requires_grad=True)
    out = barlow_twins(one, one)  # a batch of one: no cross-correlation, no term (and no NaN)
    assert float(out.detach()) == 0.0 and out.requires_grad


def test_sherl_with_barlow_twins_logs_its_term_and_plain_runs_save_as_before(tmp_path, full_cache,  # noqa: F811
                                                                             labeled_csv):
    pipe = pipeline(tmp_path, full_cache, labeled_csv, "barlow",
                    'late_layers = 1\nepochs = 2\neval_split = "validation"\nredundancy = "barlow"\n'
                    'redundancy_weight = 0.5')
    train(pipe, log=lambda m: None)
    epochs = [json.loads(line) for line in (tmp_path / "barlow" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    assert [set(e["losses"]) for e in epochs] == [{"task", "barlow"}] * 2
    assert all(e["loss_weights"] == {"barlow": 0.5} and e["losses"]["barlow"] > 0 for e in epochs)
    for e in epochs:
        assert e["train_loss"] == pytest.approx(e["losses"]["task"] + 0.5 * e["losses"]["barlow"], abs=1e-6)
    spec = json.loads((tmp_path / "barlow" / "model.json").read_text())["spec"]
    assert spec["redundancy"] == "barlow" and spec["redundancy_weight"] == 0.5
    plain = pipeline(tmp_path, full_cache, labeled_csv, "plain", 'late_layers = 1\nmax_steps = 2')
    train(plain, log=lambda m: None)
    spec = json.loads((tmp_path / "plain" / "model.json").read_text())["spec"]
    assert "redundancy" not in spec and "redundancy_weight" not in spec  # as runs saved before the option
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["losses"] is None  # no term, none logged
