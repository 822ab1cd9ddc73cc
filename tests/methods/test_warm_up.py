"""Self-supervised warm-up from the cache: data.unlabeled is extracted as the cache's 'unlabeled'
split (text only), and train.pretrain_epochs trains a method's features with Barlow Twins on it
before the task's epochs; the early layers never run again for either phase."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import make_backbone, one_error_line, write_full_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import evaluate
from sherl_pipe.extraction import extract
from sherl_pipe.splits import NO_LABEL
from sherl_pipe.training import train


def unlabeled_file(path, n: int = 64):
    """Text only: no label column to read."""
    rng = np.random.default_rng(3)
    words = ["good", "bad", "film", "plot", "great", "dull", "actors", "story"]
    path.write_text("text\n" + "".join(" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + "\n"
                                       for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, labeled_csv):
    root = tmp_path_factory.mktemp("warm")
    backbone = make_backbone(root / "backbone", "bert", dropout=0.0)
    path = write_full_pipeline(root / "p.toml", backbone, labeled_csv, root / "cache", root / "run",
                               'dtype = "float32"\nlate_layers = 0')
    unlabeled = f'unlabeled = "{unlabeled_file(root / "u.csv")}"\n'
    path.write_text(path.read_text().replace("split_seed = 1\n", "split_seed = 1\n" + unlabeled))
    extract(load_pipeline(str(path)))
    return path


def pipe_for(warm_cache, tmp_path, run: str, extra: str):
    return load_pipeline(str(warm_cache), [f"train.run_dir={tmp_path / run}", *extra.split()])


def test_the_unlabeled_rows_are_a_split_of_their_own(warm_cache, tmp_path):
    pipe = load_pipeline(str(warm_cache))
    cache = Cache(pipe.extract.cache)
    assert "unlabeled" in cache.splits and len(cache.read("unlabeled", "labels")) == 64
    assert set(np.asarray(cache.read("unlabeled", "labels")).tolist()) == {NO_LABEL}
    assert cache.manifest["task"]["label_names"] == ["neg", "pos"]  # the labeled files' alone
    train(pipe_for(warm_cache, tmp_path, "run", "train.max_steps=2"), log=lambda m: None)
    with pytest.raises(SherlError, match="split 'unlabeled' .* has no labels to evaluate against"):
        evaluate(tmp_path / "run", "unlabeled")
    with pytest.raises(SherlError, match="train.eval_split = 'unlabeled': that split .* has no labels"):
        train(pipe_for(warm_cache, tmp_path, "bad", "train.eval_split=unlabeled"), log=lambda m: None)


@pytest.mark.parametrize("method", ["sherl", "unipt", "lst"])
def test_a_warm_up_trains_the_features_on_the_unlabeled_split_first(warm_cache, tmp_path, method):
    extra = f"train.method={method} train.late_layers=1 train.epochs=1 train.eval_split=validation"
    train(pipe_for(warm_cache, tmp_path, "warm", f"{extra} train.pretrain_epochs=1"), log=lambda m: None)
    epochs = [json.loads(line) for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "epoch"]
    assert [e["phase"] for e in epochs] == ["pretrain", "train"]
    assert set(epochs[0]["losses"]) == {"barlow"} and "eval" not in epochs[0] and "eval" in epochs[1]
    assert epochs[0]["step"] == 8  # 64 unlabeled rows in batches of 8
    summary = json.loads((tmp_path / "warm" / "summary.json").read_text())
    assert summary["best"]["epoch"] == 2
    # the same run without the warm-up ends elsewhere: the warm-up moved the weights
    train(pipe_for(warm_cache, tmp_path, "cold", extra), log=lambda m: None)
    warm = load_file(tmp_path / "warm" / "checkpoints" / "last.safetensors")
    cold = load_file(tmp_path / "cold" / "checkpoints" / "last.safetensors")
    assert any(not torch.equal(warm[k], cold[k]) for k in cold)


def test_a_warm_up_is_refused_in_one_line_where_it_cannot_run(warm_cache, tmp_path, labeled_csv, bert_dir):
    r = CliRunner().invoke(main, ["train", str(warm_cache), "-q", "--method", "linear-probe", "--run-dir",
                                  str(tmp_path / "probe"), "--set", "train.pretrain_epochs=1"])
    one_error_line(r, "train.pretrain_epochs = 1: method 'linear-probe' has no features to warm up")
    path = write_full_pipeline(tmp_path / "plain.toml", bert_dir, labeled_csv, tmp_path / "cache", tmp_path / "run",
                               'dtype = "float32"', "pretrain_epochs = 1")
    r = CliRunner().invoke(main, ["run", str(path), "-q"])
    one_error_line(r, "trains on the split 'unlabeled'", "set data.unlabeled")
