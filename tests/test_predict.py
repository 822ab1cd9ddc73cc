"""predict on raw text gives what evaluate gives on the cached split (probabilities, not only
labels) for every method and task shape; it needs no cache and works from anywhere."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_backbone, make_text_file
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import evaluate
from sherl_pipe.extraction import extract
from sherl_pipe.prediction import predict
from sherl_pipe.training import train


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def pipeline_file(root, backbone, train_file, test_file, dtype="float32", data_extra="", train_extra=""):
    path = root / "p.toml"
    path.write_text(f"""
[data]
train = "{train_file}"
test = "{test_file}"
{data_extra}
[backbone]
source = "{backbone}"
max_length = 24
[extract]
cache = "{root / 'cache'}"
chunk_size = 16
dtype = "{dtype}"
[train]
run_dir = "{root / 'run'}"
max_steps = 6
batch_size = 8
threads = 1
eval_split = ""
{train_extra}
""")
    return path


def values(rows, names):
    return np.array([[float(r[n]) for n in names] for r in rows])


# Predict runs the early layers on differently padded batches than extraction did: the fp32 states
# agree to ~1e-6, which in an fp32 cache moves probabilities by ~1e-6 (tolerance 1e-5). In an fp16
# cache both sides round to fp16, and that noise can flip a value to the neighbouring fp16 number
# (one step, 2**-11 relative); a few such flips move a probability by ~1e-4 (tolerance 2e-3).
CASES = {
    "sherl-fp32": ({}, "float32", 1e-5),
    "sherl-fp16": ({}, "float16", 2e-3),
    "lora": ({"mode": "live", "late_tuning": "lora"}, "float32", 1e-5),
    "full-finetune": ({"mode": "full-finetune"}, "float32", 1e-5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_gives_evaluates_probabilities(tmp_path, bert_dir, case):
    overrides, dtype, tol = CASES[case]
    train_file = make_text_file(tmp_path / "train.csv", n=96, seed=1)
    test_file = make_text_file(tmp_path / "test.csv", n=40, seed=2)
    pipe = load_pipeline(str(pipeline_file(tmp_path, bert_dir, train_file, test_file, dtype)))
    pipe = pipe.with_overrides("train", **overrides)
    extract(pipe)
    train(pipe, log=lambda m: None)
    evaluate(tmp_path / "run", "test")
    assert predict(tmp_path / "run", str(test_file), str(tmp_path / "pred.csv")) == 40
    got, want = read_csv(tmp_path / "pred.csv"), read_csv(tmp_path / "run" / "predictions_test_best.csv")
    names = [k for k in want[0] if k.startswith("prob_")]
    np.testing.assert_allclose(values(got, names), values(want, names), atol=tol, rtol=0)
    assert [r["label"] for r in got] == [r["label"] for r in want]


def test_predict_on_regression_and_text_pairs(tmp_path, bert_dir):
    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "film", "plot", "actor", "very", "not"]
    rows = [[" ".join(rng.choice(words, rng.integers(2, 6))), " ".join(rng.choice(words, rng.integers(1, 5)))]
            for _ in range(90)]
    rows = [[a, b, f"{(a.count('good') - b.count('bad')) / 2:.2f}"] for a, b in rows]
    train_file = write_rows(tmp_path / "train.csv", ["a", "b", "score"], rows[:60])
    test_file = write_rows(tmp_path / "test.csv", ["a", "b", "score"], rows[60:])
    data = 'text_column = "a"\ntext_pair_column = "b"\nlabel_column = "score"\ntask_type = "regression"'
    pipe = load_pipeline(str(pipeline_file(tmp_path, bert_dir, train_file, test_file, data_extra=data)))
    extract(pipe)
    train(pipe, log=lambda m: None)
    result = evaluate(tmp_path / "run", "test")
    assert result["baseline"]["mse"] > 0 and "pearson" in result
    predict(tmp_path / "run", str(test_file), str(tmp_path / "pred.jsonl"))
    got = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    want = read_csv(tmp_path / "run" / "predictions_test_best.csv")
    assert isinstance(got[0]["value"], float) and isinstance(got[0]["row"], int)
    np.testing.assert_allclose([g["value"] for g in got], [float(w["value"]) for w in want], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, bert_dir):
    """A run trained with relative paths, whose cache was then moved away."""
    root = tmp_path_factory.mktemp("moved")
    make_text_file(root / "train.csv", n=64, seed=1)
    make_text_file(root / "test.csv", n=24, seed=2)
    here = os.getcwd()
    os.chdir(root)
    try:
        pipe = pipeline_file(root, bert_dir, "train.csv", "test.csv")
        pipe.write_text(pipe.read_text().replace(f'"{root}/', '"'))
        extract(load_pipeline("p.toml"))
        train(load_pipeline("p.toml"), log=lambda m: None)
        evaluate("run", "test")
    finally:
        os.chdir(here)
    shutil.move(root / "cache", root / "moved-cache")
    return root


def test_predict_and_evaluate_work_from_anywhere_after_the_cache_moved(moved_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = moved_run / "run"
    n = predict(run, str(moved_run / "test.csv"), "out.csv")
    assert n == 24 and [r["label"] for r in read_csv("out.csv")] == [
        r["label"] for r in read_csv(run / "predictions_test_best.csv")]
    with pytest.raises(SherlError, match=r"cache .*cache: not found.*give its new place with --cache"):
        evaluate(run, "test")
    assert evaluate(run, "test", cache_path=str(moved_run / "moved-cache"))["rows"] == 24


def test_predict_reads_a_file_whose_header_differs_from_the_training_datas(moved_run, tmp_path):
    """Trained on a file with a header; a headerless input's columns are named by position. Without
    --no-header its first row was taken for the header (and the header of the opposite case for a text)."""
    lines = (moved_run / "test.csv").read_text().splitlines()
    (tmp_path / "bare.csv").write_text("\n".join(lines[1:]) + "\n")
    run = str(moved_run / "run")
    common = ["predict", run, "--output"]
    r = CliRunner().invoke(main, [*common, str(tmp_path / "a.csv"), "--input", str(moved_run / "test.csv")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*common, str(tmp_path / "b.csv"), "--input", str(tmp_path / "bare.csv"),
                                  "--no-header", "--text-column", "0"])
    assert r.exit_code == 0 and f"wrote {len(lines) - 1} predictions" in r.stdout, r.output
    assert read_csv(tmp_path / "a.csv") == read_csv(tmp_path / "b.csv")


def test_evaluate_names_its_files_by_checkpoint(moved_run):
    run = moved_run / "run"
    cache = str(moved_run / "moved-cache")
    evaluate(run, "test", "last", cache_path=cache)
    assert (run / "eval_test_last.json").is_file() and (run / "predictions_test_last.csv").is_file()
    assert (run / "eval_test_best.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/p.txt"], "--output {tmp}/p.txt: give a .csv or .jsonl file"),
    (["--output", "{tmp}"], "--output {tmp}: is a folder; give a .csv or .jsonl file"),
    (["--output", "{tmp}/o.csv", "--text-column", "body"], "no column 'body' (columns: text, label, score); "
                                                          "set --text-column"),
    (["--output", "{tmp}/o.csv", "--encoding", "utf-99"], "--encoding = 'utf-99' is not an encoding Python knows"),
    (["--output", "{tmp}/o.csv", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
])
def test_predict_errors_name_predicts_options(moved_run, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(main, ["predict", str(moved_run / "run"), "--input", str(moved_run / "test.csv"), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in lines[0]


def test_predict_refuses_values_beyond_the_cache_dtype(tmp_path):
    """Training texts stay in fp16's range; the unknown token in the new text does not."""
    from safetensors.torch import load_file, save_file

    folder = make_backbone(tmp_path / "hot", "bert")
    state = load_file(folder / "model.safetensors")
    state["embeddings.LayerNorm.weight"] = torch.full_like(state["embeddings.LayerNorm.weight"], 15000.0)
    state["embeddings.LayerNorm.bias"] = torch.zeros_like(state["embeddings.LayerNorm.bias"])
    state["embeddings.word_embeddings.weight"][1] = 0.0  # [UNK]: one huge component, never in training
    state["embeddings.word_embeddings.weight"][1, 0] = 1e4
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    train_file = make_text_file(tmp_path / "train.csv", n=64, seed=1)
    pipe = load_pipeline(str(pipeline_file(tmp_path, folder, train_file, train_file, dtype="float16")))
    extract(pipe)
    train(pipe, log=lambda m: None)
    new = write_rows(tmp_path / "new.csv", ["text"], [["good film"], ["€ good"]])
    with pytest.raises(SherlError, match=r"tier h\[0\] has values up to .*beyond float16's range"):
        predict(tmp_path / "run", str(new), str(tmp_path / "out.csv"))
    assert not (tmp_path / "out.csv").exists()


def test_predict_runs_the_early_layers_outside_autocast(moved_run, tmp_path, monkeypatch):
    import contextlib

    import sherl_pipe.prediction as prediction
    from sherl_pipe.backbone import Backbone

    inside = []
    seen = []

    @contextlib.contextmanager
    def spying_autocast(device, precision="auto"):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    early = Backbone.early_states
    monkeypatch.setattr(prediction, "autocast", spying_autocast)
    monkeypatch.setattr(Backbone, "early_states", lambda self, *a, **k: (seen.append(bool(inside)),
                                                                          early(self, *a, **k))[1])
    predict(moved_run / "run", str(moved_run / "test.csv"), str(tmp_path / "o.csv"))
    assert seen and not any(seen)


def test_predict_refuses_texts_that_are_not_text(moved_run, tmp_path):
    """A JSONL text given as a list (pre-tokenized) was fed to the model as "['a', 'good', 'film']"."""
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "a good film"}\n{"text": ["a", "good", "film"]}\n{"text": 42}\n')
    with pytest.raises(SherlError, match=r"^input file .*in.jsonl: column 'text' holds values that are not "
                                         r"text in data rows 2 \(row 2: a list\); store each text as one string$"):
        predict(moved_run / "run", str(bad), str(tmp_path / "out.csv"))
    assert not (tmp_path / "out.csv").exists()


def test_a_backbone_that_moved_is_blamed_on_predicts_own_option(moved_run, tmp_path):
    """The run's backbone folder gone: the error pointed at backbone.source, a key of a pipeline
    file predict never reads; a wrong --backbone is named as --backbone."""
    import json as _json

    run = tmp_path / "run"
    shutil.copytree(moved_run / "run", run)
    info = _json.loads((run / "model.json").read_text())
    info["backbone_folder"] = str(tmp_path / "gone")
    (run / "model.json").write_text(_json.dumps(info))
    args = ["predict", str(run), "--input", str(moved_run / "test.csv"), "--output", str(tmp_path / "o.csv")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and f"its backbone {tmp_path / 'gone'} is gone" in r.stderr, r.output
    assert "--backbone" in r.stderr and "backbone.source" not in r.stderr
    r = CliRunner().invoke(main, args + ["--backbone", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and f"--backbone '{tmp_path / 'nowhere'}': not a Hugging Face model folder" in r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_leaves_no_temporary_in_the_users_folder(moved_run, tmp_path, monkeypatch):
    """predict's output written to a full disk (the kernel's ENOSPC names no file): the error names
    the output and its temporary NAME.PID.partial is removed."""
    out = tmp_path / "o.csv"
    (tmp_path / f"o.csv.{os.getpid()}.partial").symlink_to("/dev/full")
    r = CliRunner().invoke(main, ["predict", str(moved_run / "run"), "--input", str(moved_run / "test.csv"),
                                  "--output", str(out)])
    assert r.exit_code == 2 and f"{out}: No space left on device" in r.stderr, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
