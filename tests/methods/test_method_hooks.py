"""What a method can add to the trainer without touching it (methods/base.py): loss terms of its
own (named, weighted, logged per epoch, shown by `info`), parameter groups at rates of its own, and
phases that follow each other and resume like epochs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from sherl_pipe.cli import main
from sherl_pipe.errors import SherlError
from sherl_pipe.methods import REGISTRY
from sherl_pipe.methods.base import Method, Phase
from sherl_pipe.model import pool
from sherl_pipe.training import train
from test_methods import _after, full_cache, pipeline  # noqa: F401 (full_cache: the module's fixture)
from toy_method import ToyModel

GATE_LR = 7e-3


class GatedModel(ToyModel):
    """The toy method's model with a gate of its own (trained in its own parameter group), and a
    buffer that counts how often a phase was entered (what enter_phase changes lives in the state)."""

    def __init__(self, spec, config):
        super().__init__(spec, config)
        self.gate = nn.Parameter(torch.zeros(config.hidden_size))
        self.register_buffer("entered", torch.zeros(2))

    def forward_batch(self, batch):
        mixed = self.blend((batch.states[1].float() + batch.states[self.spec.num_layers].float()) / 2)
        return self.head(pool(mixed * (1 + self.gate), batch.mask, "mean", None))

    def features(self, batch):
        return pool(self.blend(batch.states[self.spec.num_layers].float()), batch.mask, "mean", None)


class Hooked(Method):
    """Two phases: 'warm' (no task: a term pulling the blended features' norm to 1), then the task
    with a small L2 term on the gate."""

    name = "hooked"
    lr = 2e-3

    def reads(self, spec):
        return [1, spec.num_layers]

    def build(self, spec, config, modules):
        return GatedModel(spec, config)

    def phases(self, spec, cfg):
        return [Phase("warm", 1, supervised=False), Phase("task", cfg.epochs)]

    def enter_phase(self, model, phase):
        model.entered[0 if phase.name == "warm" else 1] = 1.0  # idempotent: set, not added

    def losses(self, model, batch, outputs, phase):
        if phase.name == "warm":
            return {"norm": (1.0, (model.features(batch).norm(dim=-1) - 1).pow(2).mean())}
        return {"gate_l2": (0.01, model.gate.pow(2).sum())}

    def parameter_groups(self, model, spec, cfg):
        return [{"name": "gate", "params": [model.gate], "lr": GATE_LR, "weight_decay": 0.0}]


def epochs_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "epoch"]


def test_phases_terms_and_groups_train_log_and_resume_exactly(tmp_path, full_cache, labeled_csv,  # noqa: F811
                                                               monkeypatch):
    monkeypatch.setitem(REGISTRY, "hooked", Hooked)
    pipe = pipeline(tmp_path, full_cache, labeled_csv, "whole", 'method = "hooked"\nepochs = 2\n'
                                                                  'eval_split = "validation"')
    train(pipe, log=lambda m: None)
    run = tmp_path / "whole"
    epochs = epochs_of(run)
    assert [e["phase"] for e in epochs] == ["warm", "task", "task"]
    assert "eval" not in epochs[0] and all("eval" in e for e in epochs[1:])  # the warm-up is not evaluated
    assert set(epochs[0]["losses"]) == {"norm"} and set(epochs[1]["losses"]) == {"task", "gate_l2"}
    assert epochs[1]["loss_weights"] == {"gate_l2": 0.01}
    objective = epochs[2]["losses"]["task"] + 0.01 * epochs[2]["losses"]["gate_l2"]
    assert epochs[2]["train_loss"] == pytest.approx(objective, abs=1e-6)  # train_loss: the objective minimised
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["epoch"] in (2, 3) and set(summary["losses"]) == {"task", "gate_l2"}
    state = torch.load(run / "checkpoints" / "state.pt", weights_only=False)
    groups = {g["name"]: g["initial_lr"] for g in state["optimizer"]["param_groups"]}
    assert groups == {"gate": GATE_LR, "new": 2e-3}  # the gate in its group only, at its own rate
    weights = load_file(run / "checkpoints" / "last.safetensors")
    assert weights["entered"].tolist() == [1.0, 1.0] and weights["gate"].abs().sum() > 0
    out = CliRunner().invoke(main, ["info", str(run)])
    assert out.exit_code == 0 and "losses     task " in out.output and "gate_l2 " in out.output, out.output
    assert "(weight 0.01)" in out.output
    # stopped inside the warm-up, resumed: the same weights as the whole run
    cut = pipe.with_overrides("train", run_dir=str(tmp_path / "cut"))
    assert train(cut, log=lambda m: None, should_stop=_after(steps=3)).stop_reason == "interrupted"
    train(cut, resume=True, log=lambda m: None)
    a, b = load_file(tmp_path / "cut" / "checkpoints" / "last.safetensors"), weights
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    for got, want in zip(epochs_of(tmp_path / "cut"), epochs, strict=True):  # the terms' sums survive the cut
        assert got["losses"] == pytest.approx(want["losses"], abs=1e-6)


def test_a_phase_with_nothing_to_minimise_is_one_error(tmp_path, full_cache, labeled_csv, monkeypatch):  # noqa: F811
    class Empty(Hooked):
        def losses(self, model, batch, outputs, phase):
            return {}

    monkeypatch.setitem(REGISTRY, "hooked", Empty)
    pipe = pipeline(tmp_path, full_cache, labeled_csv, "run", 'method = "hooked"\nepochs = 1')
    with pytest.raises(SherlError, match="phase 'warm' has neither the task's loss nor a term"):
        train(pipe, log=lambda m: None)


def test_a_phase_on_a_split_the_cache_lacks_is_refused_before_training(tmp_path, full_cache, labeled_csv,  # noqa: F811
                                                                      monkeypatch):
    class Elsewhere(Hooked):
        def phases(self, spec, cfg):
            return [Phase("warm", 1, split="unlabeled", supervised=False), Phase("task", cfg.epochs)]

    monkeypatch.setitem(REGISTRY, "hooked", Elsewhere)
    pipe = pipeline(tmp_path, full_cache, labeled_csv, "run", 'method = "hooked"\nepochs = 1')
    with pytest.raises(SherlError, match="phase 'warm' trains on the split 'unlabeled'"):
        train(pipe, log=lambda m: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
