"""Stage two: training from the cache equals training live, resumes exactly, loads no early layers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SST2, make_backbone, require_minilm, require_sst2, write_full_pipeline, write_pipeline
from sherl_pipe.config import load_pipeline
from sherl_pipe.consolidation import TIER_SCORES
from sherl_pipe.devices import pick_device
from sherl_pipe.errors import SherlError
from sherl_pipe.extraction import extract
from sherl_pipe.training.batches import ChunkSampler
from sherl_pipe.training import train
from train_helpers import batch_losses_and_grads, losses, pipeline_for, regression_pipeline, step_losses


def test_sampler_is_seeded_chunk_aware_and_complete():
    s = ChunkSampler(n=96, chunk_size=16, batch_size=8, buffer_chunks=2, seed=3)
    batches = s.batches(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(96))
    assert all(np.array_equal(a, b) for a, b in zip(batches, s.batches(0)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, s.batches(1)))
    # each window of 2 chunks (32 samples) is consumed before the next one starts
    order = np.concatenate(batches)
    chunks_per_window = [set((order[w:w + 32] // 16).tolist()) for w in range(0, 96, 32)]
    assert all(len(c) == 2 for c in chunks_per_window)
    assert sorted(np.concatenate(ChunkSampler(100, 16, 8, 2, 3).batches(0)).tolist()) == list(range(100))
    sequential = ChunkSampler(10, 4, 3, 1, 0, shuffle=False).batches(0)
    assert [b.tolist() for b in sequential] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_and_live_batches_give_the_same_loss_and_gradients(tmp_path, labeled_csv, dtype, tol):
    """fp32: live states differ from cached ones only by batch-composition noise (<= 1e-6), so the
    loss and every gradient agree to 1e-5. fp16: both sides round to fp16 and that noise can flip a
    value to its neighbouring fp16 number (one step: 2**-11 of it); a few such flips per batch move
    loss and gradients by ~1e-4, so they agree to 2e-3 (relative to the gradient's scale)."""
    backbone = make_backbone(tmp_path / "nodrop", "bert", dropout=0.0)
    got = batch_losses_and_grads(tmp_path, backbone, labeled_csv, tmp_path / "cache", f'dtype = "{dtype}"')
    assert len(got["cached"]) == len(got["live"]) == 15
    for (loss_c, grads_c), (loss_l, grads_l) in zip(got["cached"], got["live"]):
        assert abs(loss_c - loss_l) <= tol
        assert grads_c.keys() == grads_l.keys()
        for name, g in grads_c.items():
            scale = max(1.0, float(g.abs().max()))
            assert float((g - grads_l[name]).abs().max()) <= tol * scale, name


@pytest.fixture(scope="module")
def nodrop_backbone_and_cache(tmp_path_factory, labeled_csv):
    """A dropout-free backbone and its fp32 cache (extracted by the first test that needs it)."""
    root = tmp_path_factory.mktemp("nodrop")
    return make_backbone(root / "backbone", "bert", dropout=0.0), root / "cache"


@pytest.mark.parametrize("tier_score", list(TIER_SCORES))
def test_every_tier_score_gets_the_same_loss_and_gradients_cached_and_live(tmp_path, labeled_csv, tier_score,
                                                                           nodrop_backbone_and_cache):
    """The fp32 case above for every train.tier_score (the test above runs the default)."""
    backbone, cache = nodrop_backbone_and_cache
    got = batch_losses_and_grads(tmp_path, backbone, labeled_csv, cache, 'dtype = "float32"',
                                 train_extra=f'tier_score = "{tier_score}"', batches=4)
    assert len(got["cached"]) == len(got["live"]) == 4
    for (loss_c, grads_c), (loss_l, grads_l) in zip(got["cached"], got["live"]):
        assert abs(loss_c - loss_l) <= 1e-5 and grads_c.keys() == grads_l.keys()
        for name, g in grads_c.items():
            assert float((g - grads_l[name]).abs().max()) <= 1e-5 * max(1.0, float(g.abs().max())), name


def test_cached_and_live_training_stay_together(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """20 steps (dropout on, so the dropout streams must match too). The first step's loss is the
    same function of the same inputs: equal to 1e-6. After that, exact agreement is not a property
    of the method: the consolidation's ReLUs and Adam's first steps (each weight moves by ~lr
    whatever its gradient's size, so a near-zero gradient that fp32 noise flips moves its weight by
    up to 2 * lr) turn 1e-7 of input noise into weight differences of order lr. Hence per-step
    losses to 1e-3 and weights to 5 * lr = 5e-3; a data mismatch changes the losses from step 1."""
    results = {}
    for mode in ("cached", "live"):
        pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / mode,
                            f'mode = "{mode}"\nmax_steps = 20\neval_split = ""\ndropout = 0.1\nlog_every = 1\n'
                            f'lr = 0.001')
        train(pipe, log=lambda m: None)
        results[mode] = load_file(tmp_path / mode / "checkpoints" / "last.safetensors")
    cached_loss, live_loss = step_losses(tmp_path / "cached"), step_losses(tmp_path / "live")
    assert len(cached_loss) == 20 and abs(cached_loss[0] - live_loss[0]) <= 1e-6
    assert np.allclose(cached_loss, live_loss, atol=1e-3, rtol=0)
    assert results["cached"].keys() == results["live"].keys()
    for key, value in results["cached"].items():
        torch.testing.assert_close(value, results["live"][key], atol=5e-3, rtol=0)


def test_the_early_network_is_never_loaded(tmp_path, bert_dir, labeled_csv, fp32_cache):
    late_only = tmp_path / "late-only"
    shutil.copytree(bert_dir, late_only)
    state = load_file(late_only / "model.safetensors")
    kept = {k: v for k, v in state.items() if not k.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1."))}
    assert len(kept) < len(state)
    save_file(kept, late_only / "model.safetensors", metadata={"format": "pt"})
    pipe = pipeline_for(tmp_path, late_only, labeled_csv, fp32_cache, tmp_path / "run",
                        'max_steps = 5\neval_split = "validation"\npooling = "cls-pooler"')
    result = train(pipe, log=lambda m: None)
    assert result.steps == 5 and result.best is not None
    # a backbone with other weights is refused
    other = make_backbone(tmp_path / "other", "bert", seed=7)
    pipe = pipeline_for(tmp_path, other, labeled_csv, fp32_cache, tmp_path / "run2", "max_steps = 5")
    with pytest.raises(SherlError, match=r"module 'layer.2' differs from the one the cache was made with"):
        train(pipe, log=lambda m: None)


def test_the_default_late_route_is_two_layers_over_a_default_cache(fp32_cache):
    """The defaults chosen by sweeps (docs/results/2026-11-24-defaults.md): a cache extracted at the default k = 1
    stores every tier, and the model spec of the default training config on that cache's manifest
    has k = 2: the anchor h[L-2] and the tiers below it (one default cache serves k = 1 and 2;
    training at k = 2 itself is tested in test_families and test_sweep)."""
    from sherl_pipe.cache import Cache
    from sherl_pipe.config import ExtractConfig, TrainConfig
    from sherl_pipe.training.setup import make_spec

    assert (ExtractConfig().late_layers, TrainConfig().late_layers) == (1, 2)
    manifest = Cache(fp32_cache).manifest
    assert manifest["tiers"] == [0, 1, 2]  # the tiny BERT's 3 layers, cut at k = 1
    spec = make_spec(TrainConfig(), manifest)
    assert (spec.late_layers, spec.tiers) == (2, (0,))  # anchor h[1]; the consolidation reads h[0]


@pytest.mark.parametrize("tuning", ["frozen", "norm-bias", "lora", "full"])
def test_late_tuning_modes_train_what_they_say(tmp_path, bert_dir, labeled_csv, fp32_cache, tuning):
    from sherl_pipe.backbone import read_tensors, FAMILIES

    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        f'late_tuning = "{tuning}"\nmax_steps = 3\neval_split = ""\nlr_late = 0.01')
    train(pipe, log=lambda m: None)
    after = load_file(tmp_path / "run" / "checkpoints" / "last.safetensors")
    before = read_tensors(bert_dir, FAMILIES["bert"], "encoder.layer.2.")
    changed = {k for k, v in before.items()
               if not torch.equal(after.get(f"late.0.{k}", after.get(f"late.0.{k.replace('.weight', '.base_layer.weight').replace('.bias', '.base_layer.bias')}")), v)}
    if tuning in ("frozen", "lora"):
        assert changed == set()
    elif tuning == "norm-bias":
        assert changed and all("LayerNorm" in k or k.endswith("bias") for k in changed)
    else:
        assert "attention.self.query.weight" in changed
    if tuning == "lora":
        assert any("lora_" in k for k in after)
    assert any(k.startswith("consolidation.") for k in after)


def test_run_folder_is_refused_unless_resume_or_overwrite(tmp_path, bert_dir, labeled_csv, fp32_cache):
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run", "max_steps = 2")
    first = train(pipe, log=lambda m: None)
    assert abs(first.samples_per_s * first.seconds - 2 * 8) < 1e-6  # two steps of batch 8
    with pytest.raises(SherlError, match=r"run folder .* already exists; use --resume .* --overwrite"):
        train(pipe, log=lambda m: None)
    assert train(pipe, overwrite=True, log=lambda m: None).steps == 2
    with pytest.raises(SherlError, match=r"nothing to resume"):
        train(pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "new", "max_steps = 2"),
              resume=True, log=lambda m: None)


def test_regression_does_not_depend_on_the_targets_units(tmp_path, bert_dir):
    """The head predicts in the training targets' sd units around their mean: the same task with
    scores in other units (x 200, + 1000) trains the same model. Unscaled, a head starting near 0
    ended the default epochs far from targets around 1,000 (worse than predicting their mean)."""
    from sherl_pipe.evaluation import evaluate

    runs = {}
    for name, unit, offset in [("small", 0.25, 0.0), ("large", 50.0, 1000.0)]:
        pipe = regression_pipeline(tmp_path, bert_dir, name, unit, offset, "epochs = 2")
        extract(pipe)
        train(pipe, log=lambda m: None)
        runs[name] = evaluate(pipe.train.run_dir, "test", "last")
    small, large = runs["small"], runs["large"]
    assert large["mse"] < 2 * large["baseline"]["mse"], large  # unscaled: ~1000^2, 100x the baseline
    assert large["pearson"] == pytest.approx(small["pearson"], abs=1e-3)
    assert large["mse"] == pytest.approx(small["mse"] * 200 ** 2, rel=1e-2)


@pytest.mark.slow
def test_a_regression_head_reaches_the_targets_spread_at_the_defaults(tmp_path):
    """Real pooled features (MiniLM) vary little between samples along any one direction, so an
    unnormalized linear head moved at lr 1e-3 ended the default 3 epochs with predictions huddled
    around the mean: word counts of SST-2 phrases gave a test MSE 0.76x the mean baseline's (Pearson
    0.72-0.76, seeds 0 and 1); with the head standardizing its input and starting at the mean,
    0.29-0.37 (Pearson 0.89)."""
    import csv

    from sherl_pipe.evaluation import evaluate

    require_sst2()
    require_minilm()
    with open(SST2 / "train.tsv", encoding="utf-8") as f:
        phrases = [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][:600]
    data = tmp_path / "words.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "words")] + [(p, len(p.split())) for p in phrases])
    path = tmp_path / "p.toml"
    path.write_text(f'[data]\nsource = "{data}"\nlabel_column = "words"\ntask_type = "regression"\n'
                    f'split_sizes = [400, 100, 100]\n[extract]\ncache = "{tmp_path / "c"}"\n'
                    f'[train]\nrun_dir = "{tmp_path / "run"}"\n')
    pipe = load_pipeline(str(path))
    extract(pipe)
    for seed in (0, 1):
        train(pipe.with_overrides("train", seed=seed), overwrite=True, log=lambda m: None)
        ev = evaluate(pipe.train.run_dir, "test", "last")
        assert ev["mse"] < 0.5 * ev["baseline"]["mse"], (seed, ev)


def test_regression_and_full_finetune(tmp_path, bert_dir):
    pipe = regression_pipeline(tmp_path, bert_dir, "reg", train_extra="epochs = 3\nlr = 0.003")
    extract(pipe)
    result = train(pipe, log=lambda m: None)
    assert set(result.best) >= {"pearson", "spearman", "mse"} and result.best["pearson"] > 0.5
    ft = train(pipe.with_overrides("train", method="full-finetune", run_dir=str(tmp_path / "ft"), epochs=1),
               log=lambda m: None)
    assert ft.steps == 6 and "pearson" in ft.best


def test_a_diverging_run_stops_with_an_error_instead_of_training_nan(tmp_path, bert_dir):
    """A learning rate far too large makes the loss overflow (so did targets near float32's limit
    before the loss was taken in their sd units, in float64): the run used to finish with NaN
    weights and metrics that looked real; it stops at the first non-finite loss, naming the step."""
    pipe = regression_pipeline(tmp_path, bert_dir, "huge-lr", train_extra="lr = 1e30")
    extract(pipe)
    with pytest.raises(SherlError, match=r"^train loss is (inf|nan) at step 2 \(epoch 1\): training diverged; lower "):
        train(pipe, log=lambda m: None)


def test_targets_near_float32s_limit_train_in_their_sd_units(tmp_path, bert_dir):
    """Targets of 3e38 overflowed float32's MSE (the run stopped as diverged) and the mean
    baseline (inf); in sd units and float64 the run trains and both are finite."""
    from sherl_pipe.evaluation import evaluate

    data = tmp_path / "big.csv"
    data.write_text("text,score\n" + "".join(f"good film {i},{3e38 if i % 2 else i}\n" for i in range(40)))
    path = tmp_path / "p.toml"
    write_pipeline(path, bert_dir, data, tmp_path / "cache")
    path.write_text(path.read_text().replace('split_sizes = [0.6, 0.2, 0.2]', 'split_sizes = [0.6, 0.2, 0.2]\n'
                                             'label_column = "score"\ntask_type = "regression"')
                    + f'\n[train]\nrun_dir = "{tmp_path / "run"}"\nlate_layers = 1\nbatch_size = 8\n')
    pipe = load_pipeline(str(path))
    extract(pipe)
    train(pipe, log=lambda m: None)
    ev = evaluate(pipe.train.run_dir, "test", "last")
    assert np.isfinite(ev["mse"]) and np.isfinite(ev["baseline"]["mse"]), ev


def test_bad_stage_two_settings(tmp_path, bert_dir, labeled_csv, fp32_cache):
    for extra, message in [
        # more late layers than the backbone has: the fix is a smaller k (re-extracting cannot help)
        ("late_layers = 4", r"^train.late_layers = 4: the backbone has 3 layers and at least one must stay early "
                            r"\(cached\); set train.late_layers to at most 2$"),
        ("late_layers = 3", r"^train.late_layers = 3: the backbone has 3 layers"),
        ("tiers = [5]", r"train.tiers: tier 5 is not a stored tier"),
        ("epochs = 0", r"nothing to train"),
    ]:
        pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "r", extra)
        with pytest.raises(SherlError, match=message):
            train(pipe, overwrite=True, log=lambda m: None)
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, tmp_path / "no-cache", tmp_path / "r", "")
    with pytest.raises(SherlError, match=r"not found \(no zarr.json\); run `sherl-pipe extract` first"):
        train(pipe, log=lambda m: None)


def test_a_one_class_evaluation_split_is_warned_about(tmp_path, bert_dir, labeled_csv):
    """Picking the best epoch on a split of one class means nothing (accuracy is the same for many
    models, MCC 0); training said nothing of it."""
    rows = labeled_csv.read_text().splitlines()
    (tmp_path / "val.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if ",pos," in r][:10]) + "\n")
    path = tmp_path / "p.toml"
    path.write_text(f'[data]\ntrain = "{labeled_csv}"\nvalidation = "{tmp_path / "val.csv"}"\n'
                    f'[backbone]\nsource = "{bert_dir}"\nmax_length = 24\n[extract]\ncache = "{tmp_path / "c"}"\n'
                    f'[train]\nrun_dir = "{tmp_path / "run"}"\nlate_layers = 1\nmax_steps = 1\nbatch_size = 8\n')
    pipe = load_pipeline(str(path))
    extract(pipe, log=lambda m: None)
    said = []
    train(pipe, log=said.append)
    assert any(m.startswith("warning: train.eval_split 'validation' holds one class only") for m in said), said
    said.clear()
    train(pipe.with_overrides("train", eval_split=""), overwrite=True, log=said.append)
    assert not any("one class" in m for m in said), said


def test_early_stopping(tmp_path, bert_dir, labeled_csv, fp32_cache):
    # lr 0 never improves after the first epoch: stop after one more
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'epochs = 6\nearly_stopping = 1\nlr = 1e-12\neval_split = "validation"')
    result = train(pipe, log=lambda m: None)
    assert result.stopped_early and result.epochs_done == 2


@pytest.mark.parametrize("batching", ["bucketed", "shuffled"])
def test_every_method_and_tier_choice_gets_the_same_batches(tmp_path, bert_dir, labeled_csv, fp32_cache, batching):
    """The window cap counts the tiers the cache stores, not those a method reads."""
    from sherl_pipe.cache import Cache
    from sherl_pipe.training.setup import make_spec, source_for

    cache = Cache(fp32_cache)
    variants = {"cached": 'mode = "cached"', "one tier": 'mode = "cached"\ntiers = [1]',
                "live": 'mode = "live"', "full-finetune": 'mode = "full-finetune"'}
    one_chunk_mb = None
    plans = {}
    for name, extra in variants.items():
        pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "r", extra)
        source = source_for(cache, "train", make_spec(pipe.train, cache.manifest))
        one_chunk_mb = one_chunk_mb or max(source.chunk_bytes()) / 2**20
        sampler = source.sampler(4, 8, 2.5 * one_chunk_mb, 0, batching)
        if batching == "bucketed":
            chunks = range(source.n_chunks)
            assert 1 < len(sampler.windows(chunks)) < len(chunks)  # the MB cap binds
        plans[name] = sampler.batches(0)
    for name, plan in plans.items():
        assert len(plan) == len(plans["cached"])
        for a, b in zip(plan, plans["cached"]):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_shuffled_batches_draw_from_the_whole_split():
    bucketed = ChunkSampler(n=256, chunk_size=16, batch_size=16, buffer_chunks=1, seed=0)
    shuffled = ChunkSampler(n=256, chunk_size=16, batch_size=16, buffer_chunks=1, seed=0, policy="shuffled")
    assert all(len(np.unique(b // 16)) == 1 for b in bucketed.batches(0))  # one chunk a batch
    assert np.mean([len(np.unique(b // 16)) for b in shuffled.batches(0)]) > 8
    assert sorted(np.concatenate(shuffled.batches(1)).tolist()) == list(range(256))


@pytest.mark.parametrize("budget, big_batch, small_batch, steps", [
    ("max_steps = 4", 8, 4, 4),
    # 120 rows: 15 batches of 8, so the epoch's last accumulation step holds a single batch
    ("epochs = 1", 16, 8, 8),
])
def test_gradient_accumulation_equals_the_bigger_batch(tmp_path, labeled_csv, monkeypatch, budget, big_batch,
                                                       small_batch, steps):
    """Every optimizer step's gradient with grad_accum 2 equals the gradient of the batch twice as
    big, a short last step included (it must be that batch's own mean gradient). Gradients are
    compared, not weights: Adam's update barely depends on a gradient's scale."""
    backbone = make_backbone(tmp_path / "nodrop", "bert", dropout=0.0)  # no dropout anywhere
    common = f'dropout = 0.0\neval_split = ""\n{budget}\ngrad_clip = 0.0\nwarmup_ratio = 0.0'
    big = pipeline_for(tmp_path, backbone, labeled_csv, tmp_path / "cache", tmp_path / "big",
                       f"{common}\nbatch_size = {big_batch}")
    acc = pipeline_for(tmp_path, backbone, labeled_csv, tmp_path / "cache", tmp_path / "acc",
                       f"{common}\nbatch_size = {small_batch}\ngrad_accum = 2")
    extract(big)
    grads = []
    step = torch.optim.AdamW.step

    def recording_step(opt, *a, **kw):
        grads[-1].append([p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None])
        return step(opt, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    for pipe in (big, acc):
        grads.append([])
        assert train(pipe, log=lambda m: None).steps == steps
    # Stage two runs under bf16 autocast on CUDA: two half-batches and one whole batch then round
    # differently, by a few of bf16's 2**-8 relative steps. A missed or doubled 1/grad_accum scale
    # is a 50-100% difference, far outside either bound.
    rel = 1e-3 if pick_device("auto") == "cpu" else 4 * 2.0 ** -8
    # The bound scales with the step's largest gradient entry: a tensor whose gradient is ~1e-9
    # (a bias the loss barely reaches) differs in sign with the order of a sum, which depends on
    # the thread count earlier tests left (seen: -8.1e-10 against +8.1e-10).
    for step_big, step_acc in zip(*grads):
        scale = max(1e-6, max(float(g.abs().max()) for g in step_big))
        for g_big, g_acc in zip(step_big, step_acc):
            assert float((g_big - g_acc).abs().max()) <= rel * scale


def test_a_max_steps_stop_mid_epoch_is_not_a_finished_epoch(tmp_path, bert_dir, labeled_csv, fp32_cache):
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'max_steps = 5\neval_split = "validation"')
    result = train(pipe, log=lambda m: None)
    assert result.steps == 5 and result.epochs_done == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 0 and summary["steps"] == 5
    (epoch,) = [r for r in losses(tmp_path / "run") if r["event"] == "epoch"]
    assert epoch["complete"] is False and epoch["step"] == 5 and "eval" in epoch


def test_norm_bias_trains_the_pooler_bias_too(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from sherl_pipe.backbone import FAMILIES, read_tensors

    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'late_tuning = "norm-bias"\npooling = "cls-pooler"\nmax_steps = 3\neval_split = ""\n'
                        'lr_late = 0.01')
    train(pipe, log=lambda m: None)
    after = load_file(tmp_path / "run" / "checkpoints" / "last.safetensors")
    before = read_tensors(bert_dir, FAMILIES["bert"], "pooler.")
    assert not torch.equal(after["pooler.dense.bias"], before["dense.bias"])
    assert torch.equal(after["pooler.dense.weight"], before["dense.weight"])


def test_an_eval_split_missing_from_the_cache_is_an_error(tmp_path, bert_dir, labeled_csv, fp32_cache):
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run", 'eval_split = "dev"')
    with pytest.raises(SherlError, match=r"train.eval_split = 'dev': cache \S+ has no such split \(has: train, "
                                         r"validation, test\); .*\"\" to train without evaluation"):
        train(pipe, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_live_batches_are_on_the_device_before_the_early_layers_run(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                                    monkeypatch):
    from sherl_pipe.training.batches import Batch, LiveStates

    calls = []
    to, live_call = Batch.to, LiveStates.__call__
    monkeypatch.setattr(Batch, "to", lambda self, device: (calls.append("to"), to(self, device))[1])
    monkeypatch.setattr(LiveStates, "__call__", lambda self, batch: (calls.append("live"), live_call(self, batch))[1])
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'mode = "live"\nmax_steps = 2\neval_split = ""')
    train(pipe, log=lambda m: None)
    assert calls[:4] == ["to", "live", "to", "live"]


@pytest.mark.slow
def test_two_runs_in_one_process_equal_the_same_runs_in_fresh_processes(tmp_path, bert_dir, labeled_csv,
                                                                        fp32_cache):
    extra = 'max_steps = 6\neval_split = ""\ndropout = 0.3\nthreads = 1'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        caller_rng = torch.get_rng_state()
        for seed in (0, 1):
            pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / f"in-{seed}",
                                f"{extra}\nseed = {seed}")
            train(pipe, log=lambda m: None)
        assert torch.equal(torch.get_rng_state(), caller_rng)  # a run leaves the caller's generator alone
    finally:
        torch.set_num_threads(threads)
    for seed in (0, 1):
        path = write_full_pipeline(tmp_path / f"p{seed}.toml", bert_dir, labeled_csv, fp32_cache,
                                   tmp_path / f"out-{seed}", 'dtype = "float32"', f"{extra}\nseed = {seed}")
        subprocess.run([sys.executable, "-m", "sherl_pipe", "train", "-q", str(path)], check=True,
                       capture_output=True)
        a = load_file(tmp_path / f"in-{seed}" / "checkpoints" / "last.safetensors")
        b = load_file(tmp_path / f"out-{seed}" / "checkpoints" / "last.safetensors")
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                            monkeypatch):
    from click.testing import CliRunner

    from sherl_pipe.cli import main

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "r",
                               'dtype = "float32"', "max_steps = 2")
    r = CliRunner().invoke(main, ["train", str(path), "--run-dir", str(precious), "--overwrite", "-q"])
    assert r.exit_code == 2 and "is not a sherl-pipe run folder" in r.stderr, r.output
    assert (precious / "notes.txt").read_text() == "keep me"
    # a real run folder that is the current directory is not deleted either
    r = CliRunner().invoke(main, ["train", str(path), "-q"])
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path / "r")
    r = CliRunner().invoke(main, ["train", str(path), "--run-dir", ".", "--overwrite", "-q"])
    assert r.exit_code == 2 and "is the current directory" in r.stderr, r.output
    assert (tmp_path / "r" / "model.json").is_file()


def test_a_checkpoint_with_legacy_layernorm_names_trains(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Older BERT checkpoints name LayerNorm parameters gamma/beta; transformers renames them when
    it loads a whole model, so stage two's partial loading must too (or training fails on a
    backbone that extracted fine)."""
    legacy = tmp_path / "legacy"
    shutil.copytree(bert_dir, legacy)
    state = load_file(legacy / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in renamed)
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    pipe = pipeline_for(tmp_path, legacy, labeled_csv, fp32_cache, tmp_path / "run",
                        'max_steps = 2\neval_split = ""\npooling = "cls-pooler"\nlate_tuning = "full"')
    assert train(pipe, log=lambda m: None).steps == 2


@pytest.mark.parametrize("metric", ["macro_f1", "train_loss"])
def test_train_metric_picks_the_best_epoch(tmp_path, bert_dir, labeled_csv, fp32_cache, metric):
    """train.metric decides which epoch's weights are 'best' (a sweep ranking on macro_f1 had its
    trials keep their best-accuracy epoch)."""
    from sherl_pipe.metrics import is_better, selection

    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        f'epochs = 4\neval_split = "validation"\nmetric = "{metric}"\nlr = 0.01')
    result = train(pipe, log=lambda m: None)
    epochs = [r for r in losses(tmp_path / "run") if r["event"] == "epoch"]
    value = (lambda r: r["train_loss"]) if metric == "train_loss" else (lambda r: r["eval"][metric])
    _, direction = selection("classification", metric)
    best = epochs[0]
    for r in epochs[1:]:
        best = r if is_better(value(r), value(best), direction) else best
    assert result.best["epoch"] == best["epoch"]
    with pytest.raises(SherlError, match=r"train.metric = 'pearson' is not a classification metric"):
        train(pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "r2", 'metric = "pearson"'),
              log=lambda m: None)


def test_a_non_finite_value_never_stays_the_best():
    from sherl_pipe.metrics import is_better

    nan = float("nan")
    assert is_better(0.5, nan, "maximize") and is_better(0.5, None, "maximize")
    assert not is_better(nan, 0.5, "maximize") and not is_better(nan, None, "minimize")
    assert is_better(0.1, 0.2, "minimize") and not is_better(0.1, 0.2, "maximize")


class StepClock:
    """A clock that moves only when the loop steps: 1 s per optimizer step, the rest free, so a
    wall-clock stop is tested without timing anything."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_max_seconds_stops_training_within_the_budget_and_evaluates_the_last_epoch(tmp_path, bert_dir, labeled_csv,
                                                                                   fp32_cache, monkeypatch):
    """train.max_seconds: the run stops before a step that would pass the budget (keeping the last
    evaluation's time in reserve), evaluates the epoch it cut, and says why it stopped; the same run
    without it trains every epoch. (Old code: no such setting.)"""
    import functools

    import sherl_pipe.training.run as run_module
    from sherl_pipe.training.loop import Hooks, Trainer

    clock = StepClock()
    real_step = Trainer.optimizer_step

    def timed_step(self, batches, state):
        clock.now += 1.0
        return real_step(self, batches, state)

    monkeypatch.setattr(Trainer, "optimizer_step", timed_step)
    monkeypatch.setattr(run_module, "Hooks", functools.partial(Hooks, clock=clock))
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                        'epochs = 5\nmax_seconds = 9.5\neval_split = "validation"\nbatch_size = 16')
    result = train(pipe, log=lambda m: None)  # 120 training rows: 8 steps an epoch
    assert result.stop_reason == "max-seconds" and result.seconds <= 9.5, result
    assert result.steps == 9 and result.epochs_done == 1 and clock.now == 9.0
    epochs = [r for r in losses(tmp_path / "run") if r["event"] == "epoch"]
    assert [r["complete"] for r in epochs] == [True, False] and all("eval" in r for r in epochs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "max-seconds"
    whole = train(pipe.with_overrides("train", max_seconds=0.0, run_dir=str(tmp_path / "whole")), log=lambda m: None)
    assert whole.stop_reason is None and whole.epochs_done == 5 and whole.steps == 40
