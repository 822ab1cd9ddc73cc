"""Resuming a run: exactly equal to an uninterrupted run, and refused when anything that shapes
the run changed. Interruptions are made deterministic (a step that raises), never timed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_full_pipeline
from sherl_pipe.consolidation import PAPER_TIER_SCORE, TIER_SCORES
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.training import train


def pipeline_for(tmp_path, backbone, data, cache, run, train_extra=""):
    path = write_full_pipeline(tmp_path / f"{run.name}.toml", backbone, data, cache, run, 'dtype = "float32"',
                               train_extra)
    return load_pipeline(str(path))


def records(run_dir, event=None):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if event is None or r["event"] == event]
    for r in rows:  # timing is the only thing allowed to differ
        r.pop("samples_per_s", None)
    return rows


class StepBomb:
    """Makes the n-th optimizer step raise KeyboardInterrupt, as a Ctrl-C between steps would."""

    def __init__(self, monkeypatch, at: int):
        self.calls, original = 0, torch.optim.AdamW.step

        def step(opt, *a, **kw):
            self.calls += 1
            if self.calls == at:
                raise KeyboardInterrupt
            return original(opt, *a, **kw)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_one(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                                     monkeypatch, precision):
    extra = (f'epochs = 3\nsave_every = 4\neval_split = "validation"\ndropout = 0.1\nlog_every = 1\n'
             f'precision = "{precision}"')
    # 120 training rows in batches of 8: 15 steps an epoch; the bomb goes off in epoch 2, step 23,
    # after the checkpoint at step 20, so steps 21-22 are redone from the saved state.
    cut = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "cut", extra)
    with monkeypatch.context() as m:
        StepBomb(m, at=23)
        with pytest.raises(KeyboardInterrupt):
            train(cut, log=lambda m: None)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = train(cut, resume=True, log=lambda m: None)
    whole = train(pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "whole", extra),
                  log=lambda m: None)
    assert resumed.steps == whole.steps == 45
    a = load_file(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    got, want = records(tmp_path / "cut", "epoch"), records(tmp_path / "whole", "epoch")
    assert [r["epoch"] for r in got] == [1, 2, 3]
    for r, w in zip(got, want):  # the epoch's running loss survives the interruption
        assert r["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
        assert r["eval"] == pytest.approx(w["eval"], abs=1e-6) if "eval" in w else True
    got_train, want_train = records(tmp_path / "cut", "train"), records(tmp_path / "whole", "train")
    assert [r["step"] for r in got_train] == [r["step"] for r in want_train] == list(range(1, 46))
    for key in ("step_loss", "loss", "lr"):  # every step's own loss, the epoch's running loss, the rate
        assert [r[key] for r in got_train] == pytest.approx([r[key] for r in want_train], abs=1e-6), key
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["best"] == pytest.approx(
        json.loads((tmp_path / "whole" / "summary.json").read_text())["best"], abs=1e-6)


def test_resume_refuses_changed_training_settings(tmp_path, bert_dir, labeled_csv, fp32_cache):
    run = tmp_path / "run"
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run,
                        "epochs = 1\neval_split = \"\"\ntier_score = \"relu\"")
    train(pipe, log=lambda m: None)
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    for setting, message in [
        ("train.lr=0.01", r"train.lr: run has 0.0, request has 0.01"),
        ("train.batch_size=4", r"train.batch_size: run has 8, request has 4"),
        ("train.seed=3", r"train.seed: run has 0, request has 3"),
        ("train.epochs=2", r"cannot resume with train.epochs 1 -> 2: the learning-rate schedule"),
        ("train.max_steps=40", r"cannot resume with train.max_steps 0 -> 40"),
        # the compiler draws the dropout masks from its own generator
        ("train.compile=true", r"train.compile: run has False, request has True"),
        # another tier score is another model
        ("train.tier_score=softplus", r"train.tier_score: run has 'relu', request has 'softplus'"),
        # bf16 rounds every product of stage two differently
        ("train.precision=bf16", r"stage two ran in fp32; this resume would run it in bf16 \(train.precision = "
                                 r"bf16 on cpu\); set train.precision = fp32"),
    ]:
        with pytest.raises(SherlError, match=message):
            train(load_pipeline(str(tmp_path / "run.toml"), [setting]), resume=True, log=lambda m: None)
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before
    # settings that only say where or how fast the run goes may change
    # and auto -> fp32 on the CPU is the same precision
    train(load_pipeline(str(tmp_path / "run.toml"), ["train.threads=2", "train.save_every=5", "train.precision=fp32"]),
          resume=True, log=lambda m: None)


def test_resuming_a_finished_run_keeps_its_summary(tmp_path, bert_dir, labeled_csv, fp32_cache):
    run = tmp_path / "run"
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run, 'epochs = 1\neval_split = "validation"')
    train(pipe, log=lambda m: None)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_eval"] is not None
    messages = []
    result = train(pipe, resume=True, log=messages.append)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert result.steps == summary["steps"] and any("already finished" in m for m in messages)


def test_a_trial_that_kept_only_its_best_weights_is_never_restarted_by_resume(tmp_path, bert_dir, labeled_csv,
                                                                               fp32_cache):
    """keep = "best" drops state.pt and last: without a check, --resume (or a plain train) took the
    folder for one whose first epoch never finished and emptied it, best weights and all."""
    from sherl_pipe.evaluation import evaluate
    from sherl_pipe.training.checkpoint import keep_best_only

    run = tmp_path / "run"
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run, 'epochs = 1\neval_split = "validation"')
    train(pipe, log=lambda m: None)
    sizes = {p.name: p.stat().st_size for p in (run / "checkpoints").iterdir()}
    assert keep_best_only(run) == sizes["last.safetensors"] + sizes["state.pt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors"]
    assert evaluate(run, "validation", "best")["accuracy"] >= 0  # what a scored trial is still read for
    with pytest.raises(SherlError, match=r"last.safetensors: dropped when the trial was scored.*--checkpoint best"):
        evaluate(run, "validation", "last")
    for resume in (True, False):
        with pytest.raises(SherlError, match="kept only its best weights.*--overwrite"):
            train(pipe, resume=resume, log=lambda m: None)
    assert (run / "checkpoints" / "best.safetensors").is_file()
    assert keep_best_only(tmp_path) == 0  # no best weights: nothing is dropped


def test_a_run_that_fails_to_start_does_not_block_the_retry(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from conftest import make_backbone

    other = make_backbone(tmp_path / "other", "bert", seed=7)
    run = tmp_path / "run"
    bad = pipeline_for(tmp_path, other, labeled_csv, fp32_cache, run, "max_steps = 2")
    with pytest.raises(SherlError, match=r"differs from the one the cache was made with"):
        train(bad, log=lambda m: None)
    good = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run, "max_steps = 2")
    assert train(good, log=lambda m: None).steps == 2  # no --overwrite needed


def test_a_failed_overwrite_keeps_the_run_it_was_to_replace(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from conftest import make_backbone

    run = tmp_path / "run"
    train(pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run, "max_steps = 2"), log=lambda m: None)
    other = make_backbone(tmp_path / "other", "bert", seed=7)
    with pytest.raises(SherlError, match=r"differs from the one the cache was made with"):
        train(pipeline_for(tmp_path, other, labeled_csv, fp32_cache, run, "max_steps = 2"), overwrite=True,
              log=lambda m: None)
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "last.safetensors").is_file()


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A checkpoint written by an earlier version lacks keys added since (train.compile,
    train.precision and the precision in effect, train.tier_score, train.anchor_residual): they compare as their values
    before they existed (the defaults then: tier_score relu, the paper's), so the run resumes
    instead of being refused as changed, and another value is refused."""
    import torch

    run = tmp_path / "run"
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run,
                        "epochs = 1\neval_split = \"\"\ntier_score = \"relu\"")
    train(pipe, log=lambda m: None)
    assert "tier_score" not in json.loads((run / "model.json").read_text())["spec"]  # as earlier versions wrote it
    state_file = run / "checkpoints" / "state.pt"
    saved = torch.load(state_file, weights_only=False)
    del saved["train"]["compile"], saved["train"]["precision"], saved["precision"], saved["train"]["tier_score"]
    del saved["train"]["anchor_residual"]
    torch.save(saved, state_file)
    messages = []
    train(pipe, resume=True, log=messages.append)
    assert any("already finished" in m for m in messages)
    with pytest.raises(SherlError, match=r"train.precision: run has 'auto', request has 'bf16'"):
        train(load_pipeline(str(tmp_path / "run.toml"), ["train.precision=bf16"]), resume=True, log=lambda m: None)
    with pytest.raises(SherlError, match=r"train.tier_score: run has 'relu', request has 'softmax'"):
        train(load_pipeline(str(tmp_path / "run.toml"), ["train.tier_score=softmax"]), resume=True,
              log=lambda m: None)


def test_an_open_anchor_residual_is_part_of_the_run(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """train.anchor_residual = "open" is written into the run's spec (a "shut" one is left out, as
    runs before it existed wrote theirs) and a resume that asks for the other start is refused."""
    run = tmp_path / "run"
    pipe = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, run,
                        'max_steps = 2\neval_split = ""\nanchor_residual = "open"')
    train(pipe, log=lambda m: None)
    assert json.loads((run / "model.json").read_text())["spec"]["anchor_residual"] == "open"
    with pytest.raises(SherlError, match=r"train.anchor_residual: run has 'open', request has 'shut'"):
        train(load_pipeline(str(tmp_path / "run.toml"), ["train.anchor_residual=shut"]), resume=True,
              log=lambda m: None)


@pytest.mark.parametrize("tier_score", [t for t in TIER_SCORES if t != PAPER_TIER_SCORE])
def test_every_tier_score_resumes_exactly(tmp_path, bert_dir, labeled_csv, fp32_cache, monkeypatch, tier_score):
    """The interrupted-run test above (relu, the paper's form) for the other tier scores, shorter:
    6 steps, interrupted at step 5 after the checkpoint at step 4."""
    extra = f'max_steps = 6\nsave_every = 2\neval_split = ""\nlog_every = 1\ntier_score = "{tier_score}"'
    cut = pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "cut", extra)
    with monkeypatch.context() as m:
        StepBomb(m, at=5)
        with pytest.raises(KeyboardInterrupt):
            train(cut, log=lambda m: None)
    train(cut, resume=True, log=lambda m: None)
    train(pipeline_for(tmp_path, bert_dir, labeled_csv, fp32_cache, tmp_path / "whole", extra), log=lambda m: None)
    a = load_file(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [r["step_loss"] for r in records(tmp_path / "cut", "train")] == pytest.approx(
        [r["step_loss"] for r in records(tmp_path / "whole", "train")], abs=1e-6)
    got, want = (json.loads((tmp_path / r / "summary.json").read_text())["consolidation"] for r in ("cut", "whole"))
    assert got.keys() == want.keys() and got["on"] == "a fixed sample of the train split"
    assert got["alive"] == pytest.approx(want["alive"], abs=1e-6)
    assert got["alpha"] == pytest.approx(want["alpha"], abs=1e-6)


def test_an_interrupted_regression_run_resumes_exactly(tmp_path, bert_dir, monkeypatch):
    """A regression head standardizes with the running average of every training batch's
    statistics: a run interrupted mid-epoch must carry them over (not restart them) to equal the
    whole run."""
    from train_helpers import regression_pipeline

    extra = 'epochs = 3\nsave_every = 2\neval_split = "validation"'
    cut = regression_pipeline(tmp_path, bert_dir, "cut", train_extra=extra)  # 48 rows / 8: 6 steps an epoch
    from sherl_pipe.extraction import extract

    extract(cut)
    with monkeypatch.context() as m:
        StepBomb(m, at=9)  # epoch 2, after the checkpoint at step 8
        with pytest.raises(KeyboardInterrupt):
            train(cut, log=lambda m: None)
    train(cut, resume=True, log=lambda m: None)
    whole = cut.with_overrides("train", run_dir=str(tmp_path / "whole"))
    train(whole, log=lambda m: None)
    a = load_file(tmp_path / "run-cut" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    assert {"head.in_mean", "head.in_var", "head.batches_seen"} <= set(b)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    for r, w in zip(records(tmp_path / "run-cut", "epoch"), records(tmp_path / "whole", "epoch"), strict=True):
        assert r["train_loss"] == pytest.approx(w["train_loss"], abs=1e-6)
        assert r["eval"] == pytest.approx(w["eval"], abs=1e-6)


def test_a_regression_run_saved_by_an_earlier_version_says_so(tmp_path, bert_dir):
    """A regression run saved before the head standardized its input (no head_norm in its spec)
    was refused as 'another model than this pipeline describes', as if the user had changed it."""
    from train_helpers import regression_pipeline

    from sherl_pipe.extraction import extract

    pipe = regression_pipeline(tmp_path, bert_dir, "old", train_extra="epochs = 1")
    extract(pipe)
    train(pipe, log=lambda m: None)
    path = tmp_path / "run-old" / "checkpoints" / "state.pt"
    saved = torch.load(path, weights_only=False)
    del saved["spec"]["head_norm"]
    torch.save(saved, path)
    with pytest.raises(SherlError, match=r"saved by an earlier sherl-pipe, whose regression head had no head_norm: "
                                         r"it cannot be resumed by this version \(evaluate and predict still work\)"):
        train(pipe, resume=True, log=lambda m: None)
    saved["spec"]["head_norm"], saved["spec"]["pooling"] = True, "cls"
    torch.save(saved, path)
    with pytest.raises(SherlError, match=r"another model than this pipeline describes \(pooling: run has 'cls', "
                                         r"request has 'cls-pooler'\)"):
        train(pipe, resume=True, log=lambda m: None)
