"""`sherl-pipe export`: a finished run as a folder ONNX Runtime runs alone (the tokenizer in it, no
sherl-pipe, cache or weights file), whose outputs equal `predict`'s within 1e-4: for every method
predict serves, every backbone family, text pairs and regression, sequences of length 1 and of
max_length; bad input refused in one line with nothing left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import FAMILY_TYPES, make_backbone, make_text_file, one_error_line
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.export import export
from sherl_pipe.extraction import extract
from sherl_pipe.prediction import Predictor
from sherl_pipe.training import train
from toy_method import Toy, ToyModel

MAX_LENGTH = 24
TEXTS = ["good", "bad film", "a very good film with a great plot " * 6, "the plot was dull and the actors bad"]


def pipeline_file(root, backbone, train_file, data_extra="", train_extra="", dtype="float32"):
    path = root / "p.toml"
    path.write_text(f"""
[data]
source = "{train_file}"
split_sizes = [0.7, 0.3, 0.0]
{data_extra}
[backbone]
source = "{backbone}"
max_length = {MAX_LENGTH}
[extract]
cache = "{root / 'cache'}"
chunk_size = 16
dtype = "{dtype}"
late_layers = 0
[train]
run_dir = "{root / 'run'}"
{"" if "max_steps" in train_extra else "max_steps = 4"}
batch_size = 8
threads = 1
eval_split = "validation"
{train_extra}
""")
    return load_pipeline(str(path))


def onnx_outputs(folder, texts, pairs=None):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return session.run(["logits"], {k: enc[k].astype(np.int64) for k in names})[0], enc["attention_mask"]


def assert_like_predict(run, folder, texts, pairs=None):
    want = Predictor.load(run).outputs(texts, pairs).numpy()
    got, mask = onnx_outputs(folder, texts, pairs)
    assert mask.sum(1).max() == MAX_LENGTH  # the longest text was cut at max_length
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for text in texts[:2]:  # one at a time: batch 1, and "good" is a sequence of 3 tokens
        np.testing.assert_allclose(onnx_outputs(folder, [text])[0], Predictor.load(run).outputs([text]).numpy(),
                                   atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return make_text_file(tmp_path_factory.mktemp("export-data") / "data.csv", n=80, seed=4)


METHODS = {"sherl": "", "sherl-lora": "late_tuning = \"lora\"", "sherl-swr": "late_tuning = \"swr\"\nepochs = 2\nmax_steps = 0",
           "unipt": "method = \"unipt\"", "lst": "method = \"lst\"", "linear-probe": "method = \"linear-probe\"",
           "scalar-mix": "method = \"scalar-mix\"", "swr": "method = \"swr\"\nepochs = 2\nmax_steps = 0",
           "lora-finetune": "method = \"lora-finetune\"", "full-finetune": "method = \"full-finetune\""}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_an_export_computes_what_predict_does_for_every_method(tmp_path, bert_dir, labeled, method):
    pipe = pipeline_file(tmp_path, bert_dir, labeled, train_extra=METHODS[method])
    extract(pipe)
    train(pipe, log=lambda m: None)
    folder = export(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) >= ["README.md", "labels.json", "model.onnx"]
    assert json.loads((folder / "labels.json").read_text())["labels"] == ["neg", "pos"]
    assert_like_predict(tmp_path / "run", folder, TEXTS)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_TYPES)
def test_an_export_computes_what_predict_does_for_every_family(tmp_path, labeled, family):
    backbone = make_backbone(tmp_path / "backbone", family, dropout=0.0)
    pipe = pipeline_file(tmp_path, backbone, labeled, dtype="float16")  # the tiers rounded as the cache does
    extract(pipe)
    train(pipe, log=lambda m: None)
    assert_like_predict(tmp_path / "run", export(tmp_path / "run", tmp_path / "out"), TEXTS)


@pytest.mark.slow
def test_an_export_of_a_text_pair_regression_run(tmp_path, bert_dir):
    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "film", "plot", "actor", "very", "not"]
    rows = [(" ".join(rng.choice(words, rng.integers(2, 6))), " ".join(rng.choice(words, rng.integers(1, 5))))
            for _ in range(60)]
    data = tmp_path / "pairs.csv"
    data.write_text("a,b,score\n" + "".join(f"{a},{b},{(a.count('good') - b.count('bad')) / 2:.2f}\n" for a, b in rows))
    pipe = pipeline_file(tmp_path, bert_dir, data, 'text_column = "a"\ntext_pair_column = "b"\nlabel_column = '
                                                   '"score"\ntask_type = "regression"')
    extract(pipe)
    train(pipe, log=lambda m: None)
    folder = export(tmp_path / "run", tmp_path / "out")
    assert json.loads((folder / "labels.json").read_text())["task"] == "regression"
    assert "token_type_ids" in (folder / "README.md").read_text()
    assert_like_predict(tmp_path / "run", folder, TEXTS, ["good plot"] * 3 + ["a " * 30])


@pytest.mark.slow
def test_int8_is_written_with_its_accuracy_beside_fp32s(tmp_path, bert_dir, labeled):
    pipe = pipeline_file(tmp_path, bert_dir, labeled)
    extract(pipe)
    train(pipe, log=lambda m: None)
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run"), str(tmp_path / "out"), "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "model.int8.onnx").stat().st_size > 0
    assert "with `model.int8.onnx`" in card and "`validation` split (24 rows)" in card
    got, _ = onnx_outputs(tmp_path / "out", TEXTS)
    assert np.isfinite(got).all()


@pytest.mark.slow
def test_bad_exports_are_refused_in_one_line_and_leave_nothing(tmp_path, bert_dir, labeled):
    pipe = pipeline_file(tmp_path, bert_dir, labeled, train_extra="max_steps = 0\nepochs = 2")
    extract(pipe)
    stop = iter(range(100))
    assert train(pipe, log=lambda m: None, should_stop=lambda: next(stop) >= 2).stop_reason == "interrupted"
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    one_error_line(CliRunner().invoke(main, ["export", run, out]), "has not finished", "--resume")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    train(pipe, resume=True, log=lambda m: None)
    (tmp_path / "out").mkdir()
    one_error_line(CliRunner().invoke(main, ["export", run, out]), "exists; give a new folder")
    assert list((tmp_path / "out").iterdir()) == []
    one_error_line(CliRunner().invoke(main, ["export", str(tmp_path / "nope"), str(tmp_path / "o2")]))
    assert not (tmp_path / "o2").exists()


class Branchy(Toy):
    """A method whose forward pass branches on its data: torch.export cannot follow it."""

    def build(self, spec, config, modules):
        return BranchyModel(spec, config)


class BranchyModel(ToyModel):
    def forward_batch(self, batch):
        out = super().forward_batch(batch)
        return out * 2 if float(out.sum()) > 0 else out


@pytest.mark.slow
def test_a_model_that_cannot_be_exported_is_refused_in_one_line(tmp_path, bert_dir, labeled, monkeypatch):
    from sherl_pipe.methods import REGISTRY

    monkeypatch.setitem(REGISTRY, "branchy", Branchy)
    pipe = pipeline_file(tmp_path, bert_dir, labeled, train_extra='method = "branchy"')
    extract(pipe)
    train(pipe, log=lambda m: None)
    one_error_line(CliRunner().invoke(main, ["export", str(tmp_path / "run"), str(tmp_path / "out")]),
                   "cannot be exported to ONNX")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


class Normalised(torch.nn.Module):
    def forward(self, x):
        scores = torch.relu(x)
        return scores / (scores.sum(-1, keepdim=True) + 1e-8)


def test_the_exported_graph_keeps_a_small_epsilon(tmp_path):
    """onnxscript's optimizer dropped the 1e-8: rows of zeros came out NaN (UniPT on MiniLM, half of
    SST-2's sentences); the export now leaves optimizing to ONNX Runtime."""
    import onnxruntime as ort

    from sherl_pipe.export import onnx_file

    x = torch.tensor([[-1.0, -2.0, -3.0], [1.0, 0.0, 3.0]])
    onnx_file(Normalised(), (x,), tmp_path / "m.onnx", ["x"], None)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["logits"], {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, Normalised()(x).numpy(), atol=1e-6)


class Consolidating(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from sherl_pipe.consolidation import Consolidation

        self.module = Consolidation(16, [0, 1, 2], 3, 4, dropout=0.0).eval()

    def forward(self, h0, h1, h2, h3, mask):
        return self.module({0: h0, 1: h1, 2: h2, 3: h3}, mask)


def test_the_consolidation_exports_without_a_scatter_per_tier(tmp_path):
    """Inference copies the tiers into one buffer; exported as written, each copy became a scatter of
    the whole (n + 1, B, T, D) buffer: a fifth of ONNX Runtime's time on a MiniLM SHERL run."""
    import onnx
    import onnxruntime as ort

    from sherl_pipe.export import onnx_file

    torch.manual_seed(0)
    states = tuple(torch.randn(2, 5, 16) for _ in range(4))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    module, names = Consolidating(), ["h0", "h1", "h2", "h3", "mask"]
    with torch.no_grad():
        want = module(*states, mask).numpy()
        onnx_file(module, (*states, mask), tmp_path / "m.onnx", names, None)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"ScatterElements", "ScatterND"}, ops
    feed = dict(zip(names, [s.numpy() for s in states] + [mask.numpy()]))
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
