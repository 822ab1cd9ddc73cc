"""SHERL's operating points (train.preset, methods/sherl.py PRESETS): "memory" (the defaults) and
"accuracy" (the open start with the last two thirds of the layers fully trained), each setting
only the keys the pipeline leaves unset; `compare` shows both by default."""

from __future__ import annotations

import json

import pytest

from conftest import make_backbone, write_full_pipeline
from sherl_pipe.compare.variants import default_rows, variant_pipeline
from sherl_pipe.config import Pipeline, apply_overrides, load_pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.inspect import format_run_report, run_report
from sherl_pipe.methods import get_method
from sherl_pipe.methods.sherl import SherlOptions
from sherl_pipe.training import train
from test_methods import full_cache  # noqa: F401 (the module's fixture: an fp32 cache of every tier)


def options(*sets: str, base: Pipeline | None = None) -> SherlOptions:
    return apply_overrides(base or Pipeline(), list(sets)).train.options


def resolved(opts: SherlOptions, num_layers: int) -> SherlOptions:
    manifest = {"backbone": {"num_layers": num_layers}, "tiers": list(range(num_layers + 1))}
    return get_method("sherl").spec_options(opts, manifest)


def test_the_default_is_the_memory_preset_and_unchanged():
    o = options()
    assert (o.preset, o.late_layers, o.late_tuning, o.anchor_residual) == ("memory", 2, "frozen", "shut")
    assert resolved(o, 12).late_layers == 2


@pytest.mark.parametrize("num_layers, k", [(6, 4), (12, 8), (24, 16), (3, 2), (2, 1)])
def test_the_accuracy_preset_trains_two_thirds_of_the_layers_from_the_open_start(num_layers, k):
    o = options("train.preset=accuracy")
    assert (o.late_layers, o.late_tuning, o.anchor_residual) == (0, "full", "open")
    spec_options = resolved(o, num_layers)
    assert spec_options.late_layers == k
    assert spec_options.tiers == tuple(range(num_layers - k))  # every cached tier below the anchor


def test_a_key_the_pipeline_sets_wins_over_its_preset(tmp_path):
    assert options("train.preset=accuracy", "train.late_layers=3").late_layers == 3
    assert options("train.late_tuning=lora", "train.preset=accuracy").late_tuning == "lora"
    assert options("train.sherl.preset=accuracy").late_tuning == "full"  # from the method's own table too
    path = tmp_path / "p.toml"
    path.write_text('[train]\nanchor_residual = "shut"\n[train.sherl]\npreset = "accuracy"\n')
    o = load_pipeline(str(path)).train.options
    assert (o.anchor_residual, o.late_tuning) == ("shut", "full")


def test_a_preset_set_later_replaces_the_earlier_presets_values():
    """A compare row sherl:preset=memory on a pipeline that asks for the accuracy preset trains the
    memory preset's settings (the accuracy preset's values were never the pipeline's own keys)."""
    base = apply_overrides(Pipeline(), ["train.preset=accuracy"])
    o = variant_pipeline(base, "sherl:preset=memory").train.options
    assert (o.late_layers, o.late_tuning, o.anchor_residual) == (2, "frozen", "shut")


def test_the_section_as_written_reads_back_to_the_same_options():
    """config.json and the signatures write every key: under a preset they write its values, so a
    pipeline read back from them trains what it did (and the file shows what ran)."""
    for sets in (["train.preset=accuracy"], ["train.sherl.preset=accuracy", "train.late_layers=5"], []):
        pipe = apply_overrides(Pipeline(), sets)
        written = pipe.to_dict()
        again = Pipeline.from_dict(json.loads(json.dumps(written)), "config.json")
        assert again.train.options == pipe.train.options, sets
    written = apply_overrides(Pipeline(), ["train.preset=accuracy"]).to_dict()["train"]
    assert (written["late_tuning"], written["anchor_residual"], written["late_layers"]) == ("full", "open", 0)


def test_an_unknown_preset_is_one_line_naming_the_key():
    with pytest.raises(SherlError, match=r"--set train.preset=fast: train\.preset = 'fast' is not one of 'memory', 'accuracy'"):
        options("train.preset=fast")


def test_runs_saved_before_presets_read_as_the_memory_preset():
    saved = SherlOptions().to_saved()
    assert "preset" not in saved  # a memory run's model.json is written as before presets existed
    assert SherlOptions.from_saved(saved).preset == "memory"
    accuracy = SherlOptions(preset="accuracy", late_layers=4, late_tuning="full", anchor_residual="open")
    assert SherlOptions.from_saved(accuracy.to_saved()) == accuracy


def test_compare_shows_each_preset_as_a_row_by_default():
    assert default_rows(["sherl", "unipt", "full-finetune"]) == ["sherl", "sherl:preset=accuracy", "unipt",
                                                                 "full-finetune"]


def preset_pipeline(path, backbone, data, cache, run, extract_extra: str, train_extra: str):
    """write_full_pipeline without its [train] late_layers = 1 (it would win over the preset)."""
    write_full_pipeline(path, backbone, data, cache, run, extract_extra, train_extra)
    path.write_text(path.read_text().replace("\nlate_layers = 1\n", "\n"))
    return path


def test_a_run_at_the_accuracy_preset_trains_and_says_so(tmp_path, full_cache, labeled_csv):  # noqa: F811
    backbone, cache = full_cache
    path = preset_pipeline(tmp_path / "p.toml", backbone, labeled_csv, cache, tmp_path / "run",
                           'dtype = "float32"\nlate_layers = 0', 'preset = "accuracy"\nmax_steps = 4\neval_split = ""')
    train(load_pipeline(str(path)), log=lambda m: None)
    model = json.loads((tmp_path / "run" / "model.json").read_text())["spec"]
    assert (model["preset"], model["late_layers"], model["late_tuning"], model["anchor_residual"]) == \
        ("accuracy", 2, "full", "open")  # the tiny backbone's 3 layers: 2 trained, h[1] the anchor
    assert "preset accuracy: late layers 2 (full)" in format_run_report(run_report(str(tmp_path / "run")))


def test_a_sweep_over_presets_is_refused_where_the_cache_cannot_serve_one(tmp_path, labeled_csv):
    """The sweep's cache check read each swept value over the section as written, where every key
    stands at its default as if given: a swept accuracy preset was checked at k = 2 (old code:
    planned, then every accuracy trial failed). A 6-layer backbone, a cache of h[0] and h[4]
    (k = 2) only: the accuracy preset's anchor h[2] is not there."""
    from sherl_pipe.extraction import extract
    from sherl_pipe.sweep import plan_sweep

    backbone = make_backbone(tmp_path / "backbone", "bert", layers=6, dropout=0.0)
    path = preset_pipeline(tmp_path / "p.toml", backbone, labeled_csv, tmp_path / "cache", tmp_path / "run",
                           'dtype = "float32"\nlate_layers = 2\ntiers = [0]', 'epochs = 1')
    extract(load_pipeline(str(path)))
    path.write_text(path.read_text() + f'\n[sweep]\ndir = "{tmp_path / "sweep"}"\n[sweep.space]\n'
                    f'preset = ["memory", "accuracy"]\n')
    with pytest.raises(SherlError, match=r"sweep.space: preset = accuracy with .*: the cache cannot serve it "
                                         r"\(train.late_layers = 4: its anchor h\[2\]"):
        plan_sweep(load_pipeline(str(path)), None, None)


@pytest.mark.parametrize("pipeline", ["quickstart", "sst2.toml"])
def test_the_packaged_pipelines_leave_the_accuracy_preset_its_keys(pipeline):
    """Both wrote late_tuning = "frozen" (the default) in [train]: given, it won over the preset,
    and compare's default row sherl:preset=accuracy trained frozen late layers from the open start."""
    from pathlib import Path

    path = "quickstart" if pipeline == "quickstart" else str(Path(__file__).parents[2] / "pipelines" / pipeline)
    o = variant_pipeline(load_pipeline(path), "sherl:preset=accuracy").train.options
    assert (o.late_layers, o.late_tuning, o.anchor_residual) == (0, "full", "open")


def test_a_one_layer_backbone_is_refused_without_suggesting_k_0():
    with pytest.raises(SherlError, match=r"the backbone has 1 layers .*SHERL needs a backbone of 2 layers or more"):
        resolved(options(), 1)
