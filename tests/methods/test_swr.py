"""SWR: a policy chooses which weight tensors to reparametrize under train.swr_budget (a search
phase), the chosen ones are fine-tuned, and after training they are merged into the weights: the
trained model has the backbone's modules and parameter count. As a method of its own (`swr`, the
whole backbone, live) and as SHERL's late tuning (from the cache)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

from conftest import one_error_line, write_full_pipeline
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import load_trained
from sherl_pipe.methods.finetune import FinetuneModel
from sherl_pipe.methods.spec import config_from_manifest
from sherl_pipe.reparametrization import ReparamLinear, Reparametrization, candidate_units
from sherl_pipe.training import train
from sherl_pipe.training.checkpoint import load_weights
from train_helpers import losses

# rates high enough that a few steps on the tiny backbone move the chosen units visibly
SWR = "train.method=swr train.epochs=3 train.swr_budget=0.3 train.lr_late=0.01"
SHERL_SWR = "train.late_tuning=swr train.late_layers=2 train.epochs=3 train.swr_budget=0.2 train.lr_late=0.01"


def pipe(tmp_path, bert_dir, data, cache, run: str, extra: str):
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, data, cache, tmp_path / "r", 'dtype = "float32"')
    return load_pipeline(str(path), [f"train.run_dir={tmp_path / run}", "train.eval_split=validation",
                                     *extra.split()])


def unmerged(run):
    """The run's best model as it trained: the reparametrization not merged."""
    t = load_trained(run)
    config = config_from_manifest(t.manifest)
    model = t.spec.plugin.build(t.spec, config, t.spec.plugin.empty_modules(t.spec, config))
    load_weights(run / "checkpoints" / "best.safetensors", model, "best")
    return t.model, model.eval()


def some_ids(n: int = 6, length: int = 9, vocab: int = 40):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 4:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def swr_run(tmp_path_factory, bert_dir, labeled_csv, fp32_cache):
    root = tmp_path_factory.mktemp("swr")
    train(pipe(root, bert_dir, labeled_csv, fp32_cache, "run", SWR), log=lambda m: None)
    return root / "run"


def test_swr_searches_then_fine_tunes_the_units_its_policy_chose_within_the_budget(swr_run):
    epochs = [r for r in losses(swr_run) if r["event"] == "epoch"]
    assert [e["phase"] for e in epochs] == ["search", "train", "train"]  # swr_search_share 0.3 of 3 epochs
    assert set(epochs[0]["losses"]) == {"task", "swr-budget"} and "losses" not in epochs[1]
    report = json.loads((swr_run / "summary.json").read_text())["method_report"]
    assert report["final"] and report["candidates"] == 3 * 6  # 3 layers: query, key, value and 3 dense
    assert 0 < report["updated_weights"] <= report["budget_weights"] == int(0.3 * report["backbone_weights"])
    result = CliRunner().invoke(main, ["info", str(swr_run)])
    assert result.exit_code == 0 and f"{len(report['units'])} of 18 units reparametrized" in result.output
    assert report["units"][0] in result.output


def test_a_merged_swr_model_computes_what_it_trained_with_and_has_the_backbones_parameters(swr_run, bert_dir):
    merged, model = unmerged(swr_run)
    model.reparam.fix()  # the saved choice, as the fine-tuning phase ran it
    ids, mask = some_ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask), model(ids, mask), atol=1e-5, rtol=0)
    assert not any(isinstance(m, ReparamLinear) for m in merged.modules())
    summary = json.loads((swr_run / "summary.json").read_text())  # at the end: the chosen units and the head
    head = sum(p.numel() for p in merged.head.parameters())
    assert summary["trainable_parameters"] == summary["method_report"]["updated_weights"] + head
    plain = load_file(bert_dir / "model.safetensors")
    assert sum(p.numel() for p in merged.backbone.parameters()) == sum(
        v.numel() for k, v in plain.items() if "position_ids" not in k)
    # module for module full fine-tuning's backbone: the same computation at inference, so the same time
    backbone = FinetuneModel(merged.spec, AutoModel.from_pretrained(bert_dir)).backbone
    assert [(n, type(m)) for n, m in merged.backbone.named_modules()] == [
        (n, type(m)) for n, m in backbone.named_modules()]


def test_units_the_policy_left_keep_their_pretrained_weights_and_chosen_ones_moved(swr_run):
    merged, model = unmerged(swr_run)
    report = json.loads((swr_run / "summary.json").read_text())["method_report"]
    changed = set()
    for name, module in model.backbone.named_modules():
        if isinstance(module, ReparamLinear):
            after = merged.backbone.get_submodule(name).weight
            if not torch.equal(after, module.weight):
                changed.add(name)
    assert changed and changed == {n.replace("layer.", "encoder.layer.", 1) for n in report["units"]}


def test_sherl_with_swr_late_tuning_trains_from_the_cache_and_merges(tmp_path, bert_dir, labeled_csv, fp32_cache):
    train(pipe(tmp_path, bert_dir, labeled_csv, fp32_cache, "run", SHERL_SWR), log=lambda m: None)
    run = tmp_path / "run"
    report = json.loads((run / "summary.json").read_text())["method_report"]
    assert report["candidates"] == 2 * 6 and all(u.split(".")[1] in ("1", "2") for u in report["units"])
    assert report["budget_weights"] == int(0.2 * report["backbone_weights"])  # a share of all 3 layers'
    assert 0 < report["updated_weights"] <= report["budget_weights"]
    merged, model = unmerged(run)
    model.reparam.fix()
    g = torch.Generator().manual_seed(1)
    states = {t: torch.randn(4, 7, 32, generator=g) for t in model.spec.plugin.reads(model.spec)}
    mask = torch.ones(4, 7, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(merged(states, mask), model(states, mask), atol=1e-5, rtol=0)
    assert merged.reparam is None and not any(isinstance(m, ReparamLinear) for m in merged.modules())


@pytest.mark.parametrize("steps", [5, 25])  # in the search (an epoch is 18 steps); in the fine-tuning
def test_an_swr_run_resumed_equals_an_uninterrupted_one(tmp_path, bert_dir, labeled_csv, fp32_cache, steps):
    train(pipe(tmp_path, bert_dir, labeled_csv, fp32_cache, "whole", SWR), log=lambda m: None)
    stop = iter(range(1000))
    stopped = train(pipe(tmp_path, bert_dir, labeled_csv, fp32_cache, "cut", SWR), log=lambda m: None,
                    should_stop=lambda: next(stop) >= steps)
    assert stopped.stop_reason == "interrupted"
    train(pipe(tmp_path, bert_dir, labeled_csv, fp32_cache, "cut", SWR), resume=True, log=lambda m: None)
    whole = load_file(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    cut = load_file(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_swr_refuses_a_run_too_short_to_search_and_fine_tune(tmp_path, bert_dir, labeled_csv, fp32_cache):
    with pytest.raises(SherlError, match=r"train.epochs = 1: SWR needs at least 2"):
        train(pipe(tmp_path, bert_dir, labeled_csv, fp32_cache, "run", "train.method=swr train.epochs=1"),
              log=lambda m: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    path = write_full_pipeline(tmp_path / "q.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "q",
                               'dtype = "float32"', 'method = "swr"\nswr_budget = 0.0')
    one_error_line(CliRunner().invoke(main, ["train", str(path)]), "swr_budget")


def layers(n: int = 3, width: int = 8):
    return nn.ModuleList(nn.ModuleDict({"query": nn.Linear(width, width), "dense": nn.Linear(width, 4 * width)})
                         for _ in range(n))


def test_the_budget_penalty_steers_the_policy_and_the_projection_never_exceeds_the_budget():
    torch.manual_seed(0)
    model = layers()
    units = candidate_units(model, 0, ("query", "dense"))
    total = sum(getattr(p, a).weight.numel() for p, a, _, _ in units)
    reparam = Reparametrization(units, 3, int(0.5 * total), total)
    reparam.policy[2].bias.data.fill_(3.0)  # starts far over budget: every unit likely
    optimizer = torch.optim.Adam(reparam.policy.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        reparam.budget_penalty().backward()
        optimizer.step()
    expected = float((reparam.probabilities() * reparam.sizes).sum().detach())
    assert abs(expected - reparam.budget) / reparam.budget < 0.05
    chosen = reparam.projected()
    assert 0 < float((chosen * reparam.sizes).sum()) <= reparam.budget


def test_the_task_loss_reaches_the_policy_through_the_sampled_gates():
    torch.manual_seed(0)
    model = layers(1)
    units = candidate_units(model, 0, ("query", "dense"))
    total = sum(getattr(p, a).weight.numel() for p, a, _, _ in units)
    reparam = Reparametrization(units, 1, total // 2, total)  # gates near 0.5: not saturated
    for module in model.modules():
        if isinstance(module, ReparamLinear):
            module.delta.data.normal_()
    reparam.draw(training=True)
    x = torch.randn(5, 8)
    model[0]["dense"](model[0]["query"](x)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reparam.policy.parameters())
