"""Training methods as plug-ins (sherl_pipe/methods/): every cached method trains from the cache as
it would live, reads only the tiers it declares, loads no early layer; a toy method registered here
trains, resumes, evaluates and sweeps through the public API; pipelines, run folders and sweep
folders from before methods existed keep working."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_backbone, write_full_pipeline
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.extraction import extract
from sherl_pipe.methods import get_method, register_method
from toy_method import Toy
from sherl_pipe.training import train

CACHED = ["sherl", "unipt", "lst", "linear-probe", "scalar-mix"]


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, labeled_csv):
    """A dropout-free tiny BERT and an fp32 cache of every tier h[0..L] (extract.late_layers = 0)."""
    root = tmp_path_factory.mktemp("methods")
    backbone = make_backbone(root / "backbone", "bert", dropout=0.0)
    path = write_full_pipeline(root / "p.toml", backbone, labeled_csv, root / "cache", root / "run",
                               'dtype = "float32"\nlate_layers = 0')
    extract(load_pipeline(str(path)))
    return backbone, root / "cache"


def pipeline(tmp_path, full_cache, labeled_csv, run: str, extra: str):
    backbone, cache = full_cache
    path = write_full_pipeline(tmp_path / f"{run}.toml", backbone, labeled_csv, cache, tmp_path / run,
                               'dtype = "float32"\nlate_layers = 0', extra)
    return load_pipeline(str(path))


@pytest.mark.parametrize("method", CACHED)
def test_twenty_steps_from_the_cache_equal_twenty_live(tmp_path, full_cache, labeled_csv, method, monkeypatch):
    """Cached and live training of every cached method end at the same weights (fp32, 1e-5); the
    cached run loads no early layer and reads no tier its method does not declare."""
    import sherl_pipe.training.batches as batches
    import sherl_pipe.training.setup as setup

    loaded, opened = [], []
    real_load, real_reader = setup.load_module, batches.BlockReader
    monkeypatch.setattr(setup, "load_module", lambda f, c, fam, name: (loaded.append(name), real_load(f, c, fam, name))[1])
    monkeypatch.setattr(batches, "BlockReader", lambda p, s, name, a: (opened.append(name), real_reader(p, s, name, a))[1])
    extra = f'method = "{method}"\nmax_steps = 20\neval_split = ""\nlog_every = 1\nlate_layers = 2'
    weights = {}
    for source in ("cached", "live"):
        loaded.clear(), opened.clear()
        pipe = pipeline(tmp_path, full_cache, labeled_csv, source, f'{extra}\nsource = "{source}"')
        assert train(pipe, log=lambda m: None).steps == 20
        weights[source] = load_file(tmp_path / source / "checkpoints" / "last.safetensors")
        spec = json.loads((tmp_path / source / "model.json").read_text())["spec"]
        if source == "cached":
            from sherl_pipe.methods.spec import ModelSpec

            declared = get_method(method).reads(ModelSpec.from_dict(spec))
            assert sorted(set(opened)) == sorted(f"h{t}" for t in declared)
            anchor = spec["num_layers"] - spec.get("late_layers", 0)  # a method without late layers loads none
            assert not [n for n in loaded if n == "embeddings" or (n.startswith("layer.") and int(n[6:]) < anchor)]
    for key, w in weights["cached"].items():
        torch.testing.assert_close(w, weights["live"][key], atol=1e-5, rtol=0)


def test_a_method_reading_a_tier_the_cache_lacks_is_refused_before_training(tmp_path, bert_dir, labeled_csv,
                                                                             fp32_cache):
    """fp32_cache is cut at L - 1: h[L] is not stored."""
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                               'dtype = "float32"', 'method = "unipt"')
    with pytest.raises(SherlError, match=r"train.method = 'unipt' reads tier h\[3\], which the cache does not "
                                         r"store .*extract the cache with extract.late_layers = 0"):
        train(load_pipeline(str(path)), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_run_checks_the_method_before_extracting(tmp_path, bert_dir, labeled_csv):
    from click.testing import CliRunner

    from sherl_pipe.cli import main

    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "cache", tmp_path / "run",
                               'dtype = "float32"', 'method = "scalar-mix"')
    r = CliRunner().invoke(main, ["run", str(path), "-q"])
    assert r.exit_code == 2 and "reads tier h[3]" in r.stderr and "nothing was extracted" in r.stderr, r.output
    assert not (tmp_path / "cache").exists()
    r = CliRunner().invoke(main, ["train", str(path), "-q", "--method", "nonesuch"])
    assert r.exit_code == 2 and "train.method = 'nonesuch' is not a method; known: sherl, unipt" in r.stderr


@pytest.mark.slow
def test_a_method_registered_from_outside_trains_resumes_evaluates_and_sweeps(tmp_path, full_cache, labeled_csv,
                                                                              monkeypatch):
    import cloudpickle

    from sherl_pipe import api
    from sherl_pipe.methods import REGISTRY
    from sherl_pipe.sweep import run_sweep

    # undone after the test (monkeypatch keeps the registry as it was): a method left registered
    # is compared by every later compare without --methods (tests/compare ran before this file
    # only by their names' order)
    monkeypatch.setitem(REGISTRY, "toy", None)
    register_method("toy", Toy)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pipe = pipeline(tmp_path, full_cache, labeled_csv, "toy", 'method = "toy"\nepochs = 2\neval_split = "validation"')
    whole = train(pipe, log=lambda m: None)
    groups = torch.load(tmp_path / "toy" / "checkpoints" / "state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(2e-3, 0.0)]  # one group: new, no decay
    assert json.loads((tmp_path / "toy" / "model.json").read_text())["lr_new"] == 2e-3
    # interrupted after the first epoch, resumed: the same weights as the whole run
    cut = pipe.with_overrides("train", run_dir=str(tmp_path / "cut"))
    assert train(cut, log=lambda m: None, should_stop=_after(steps=5)).stop_reason == "interrupted"
    train(cut, resume=True, log=lambda m: None)
    a, b = load_file(tmp_path / "cut" / "checkpoints" / "last.safetensors"), load_file(
        tmp_path / "toy" / "checkpoints" / "last.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert api.evaluate(whole.run_dir, "test")["rows"] > 0
    table = '\n[sweep]\nsampler = "grid"\nworkers = 1\nthreads = 1\ndir = "{d}"\n[sweep.space]\nseed = [0, 1]\n'
    sweep_file = tmp_path / "toy.toml"
    sweep_file.write_text(sweep_file.read_text() + table.replace("{d}", str(tmp_path / "sweep")))
    result = run_sweep(load_pipeline(str(sweep_file)), log=lambda m: None)
    assert [r["state"] for r in result.report.rows] == ["complete", "complete"]


def _after(steps: int):
    """should_stop: true once the run has taken STEPS optimizer steps (counted by its calls)."""
    calls = [0]

    def stop():
        calls[0] += 1
        return calls[0] >= steps

    return stop


def test_pipelines_and_run_folders_from_before_methods_keep_working(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """train.mode (cached, live, full-finetune) reads as train.method and train.source; a run folder
    whose config.json and model.json say mode evaluates, predicts and resumes."""
    from sherl_pipe.evaluation import evaluate

    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                               'dtype = "float32"', 'mode = "live"\nepochs = 2\neval_split = ""')
    pipe = load_pipeline(str(path))
    assert (pipe.train.method, pipe.train.source) == ("sherl", "live")
    assert load_pipeline(str(path), ["train.mode=full-finetune"]).train.method == "full-finetune"
    assert train(pipe, log=lambda m: None, should_stop=_after(steps=3)).stop_reason == "interrupted"
    run = tmp_path / "run"
    for name in ("config.json", "model.json"):  # as an earlier sherl-pipe wrote them
        data = json.loads((run / name).read_text())
        for section in (data["train"] if name == "config.json" else data["spec"],):
            section.pop("method"), section.pop("source")
            section["mode"] = "live"
        (run / name).write_text(json.dumps(data))
    state = torch.load(run / "checkpoints" / "state.pt", weights_only=False)
    for section in (state["train"], state["spec"]):
        section.pop("method"), section.pop("source")
        section["mode"] = "live"
    state["train"]["reduction"] = 8  # written out before 0 meant the method's default
    torch.save(state, run / "checkpoints" / "state.pt")
    assert evaluate(run, "test", checkpoint="last")["rows"] > 0
    assert train(pipe, resume=True, log=lambda m: None).epochs_done == 2


def test_method_names_are_written_only_in_the_methods_package():
    """Nothing outside sherl_pipe/methods/ branches on a method's name: no string literal there
    names one (the CLI's help and comments may mention them)."""
    import ast
    from pathlib import Path

    import sherl_pipe
    from sherl_pipe.methods import method_names

    root = Path(sherl_pipe.__file__).parent
    names = set(method_names())
    found = []
    for path in root.rglob("*.py"):
        if "methods" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_no_function_is_longer_than_a_screen():
    """The project's rule (and issue 22's target): no function over 60 lines."""
    import ast
    from pathlib import Path

    import sherl_pipe

    long = []
    for path in Path(sherl_pipe.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
