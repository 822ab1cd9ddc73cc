"""A method owns its settings (methods/base.py, Options): a frozen dataclass in the method's module,
written as keys of [train] (each applying to every method that has it) or in the method's own
[train.<method>] table, checked by the method, carried into the run's spec and model; pipelines,
run folders and sweep signatures written when the settings were fields of [train] keep reading."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from conftest import write_full_pipeline
from sherl_pipe.config import Pipeline, load_pipeline, section_to_dict
from sherl_pipe.errors import SherlError
from sherl_pipe.fields import between, choice
from sherl_pipe.methods import REGISTRY
from sherl_pipe.methods.base import EveryTier, Options, WidthOptions
from sherl_pipe.methods.sherl import SherlOptions
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.model import Head, pool
from sherl_pipe.training import train
from test_methods import full_cache  # noqa: F401 (the module's fixture: an fp32 cache of every tier)

# [train] as it was written before methods owned their settings (a sweep signature, a config.json)
TRAIN_KEYS_BEFORE = [
    "run_dir", "method", "source", "late_layers", "tiers", "late_tuning", "projection", "tier_score",
    "anchor_residual", "reduction", "pooling", "dropout", "epochs", "max_steps", "max_seconds", "batch_size",
    "grad_accum", "lr", "lr_late", "weight_decay", "weight_decay_new", "warmup_ratio", "grad_clip", "lora_rank",
    "lora_alpha", "eval_split", "metric", "early_stopping", "save_every", "save_minutes", "log_every", "batching",
    "buffer_chunks", "buffer_mb", "preload", "compile", "precision", "seed", "threads", "device", "storage_options"]
# keys added since, which folders saved before take at their defaults (config.upgrade_saved)
TRAIN_KEYS_ADDED = ["pretrain_epochs", "redundancy", "redundancy_weight", "swr_budget", "swr_search_share",
                    "swr_policy_lr", "swr_budget_weight", "preset"]


@dataclass(frozen=True)
class BlendOptions(Options):
    weight: float = between(0.5, 0.0, 1.0)  # of the last tier against h[1]
    head: str = choice("linear", "none")


class Blend(EveryTier):
    """A method from a test file with settings of its own, and nothing of it anywhere else."""

    name = "blend"
    Options = BlendOptions

    def build(self, spec, config, modules):
        return BlendModel(spec, config)


class BlendModel(nn.Module):
    def __init__(self, spec, config):
        super().__init__()
        self.spec, self.config, self.weight = spec, config, spec.options.weight
        self.head = Head(config.hidden_size, spec.num_outputs, 0.0)

    def forward_batch(self, batch):
        last = batch.states[self.spec.num_layers].float()
        return self.head(pool(self.weight * last + (1 - self.weight) * batch.states[1].float(), batch.mask, "mean", None))

    def new_modules(self):
        return [self.head]


@pytest.fixture
def blend(monkeypatch):
    monkeypatch.setitem(REGISTRY, "blend", Blend)


def quickstart(*sets):
    return load_pipeline("quickstart", list(sets))


def test_a_key_applies_to_every_method_that_has_it_and_a_table_to_its_method_alone():
    pipe = quickstart("train.reduction=4", "train.unipt.reduction=3", "train.late_layers=1")
    assert pipe.train.options == SherlOptions(reduction=4, late_layers=1)
    by_method = {m: dataclasses.replace(pipe.train, method=m).options for m in ("unipt", "lst", "full-finetune")}
    assert by_method == {"unipt": WidthOptions(3), "lst": WidthOptions(4), "full-finetune": Options()}
    assert quickstart("train.late_layers=2", "train.sherl.late_layers=1").train.options.late_layers == 1
    assert pipe.train.late_layers == 1  # read as train.KEY: the chosen method's value


def test_a_method_with_a_setting_of_its_own_needs_nothing_outside_its_module(tmp_path, full_cache, labeled_csv,  # noqa: F811
                                                                           blend):
    backbone, cache = full_cache
    path = write_full_pipeline(tmp_path / "p.toml", backbone, labeled_csv, cache, tmp_path / "run",
                               'dtype = "float32"\nlate_layers = 0',
                               'method = "blend"\nweight = 0.25\nmax_steps = 2\neval_split = ""\n[train.blend]\nhead = "none"')
    pipe = load_pipeline(str(path), ["train.blend.weight=0.75"])  # its table, over the [train] key
    assert pipe.train.options == BlendOptions(0.75, "none")
    with pytest.raises(SherlError, match=r"train.weight = 2.0 must be <= 1.0"):
        load_pipeline(str(path), ["train.weight=2"])
    with pytest.raises(SherlError, match=r"train.blend: unknown key 'depth'; known: weight, head"):
        load_pipeline(str(path), ["train.blend.depth=3"])
    train(pipe, log=lambda m: None)
    saved = json.loads((tmp_path / "run" / "model.json").read_text())["spec"]
    assert (saved["weight"], saved["head"]) == (0.75, "none")
    assert ModelSpec.from_dict(saved).options == BlendOptions(0.75, "none")
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert Pipeline.from_dict(written, "config.json").train.options == BlendOptions(0.75, "none")
    assert written["train"]["blend"] == {"head": "none", "weight": 0.75}
    other = dataclasses.replace(pipe.train, method="sherl").options  # another method's: its own keys only
    assert isinstance(other, SherlOptions) and not hasattr(other, "weight")


@pytest.mark.parametrize("sets, message", [
    (["train.nosuch.x=1"], r"unknown key 'train.nosuch'"),
    (["train.sherl.bogus=1"], r"train.sherl: unknown key 'bogus'; known: .*reduction, preset, late_layers"),
    (["train.unipt.late_layers=3"], r"train.unipt: unknown key 'late_layers'; known: reduction"),
    (["train.sherl.late_tuning=all"], r"train.sherl.late_tuning = 'all' is not one of 'frozen'"),
    (["train.linear-probe.reduction=2"], r"train.linear-probe: unknown key 'reduction'; known: none"),
])
def test_a_bad_method_setting_is_refused_in_one_line(sets, message):
    with pytest.raises(SherlError, match=message):
        quickstart(*sets)


def test_a_train_section_is_written_as_before_methods_owned_their_settings():
    """config.json, sweep signatures and compare.json compare [train] as a dict: written as before
    (each key of the built-in methods at its default), folders saved then still match."""
    written = section_to_dict(Pipeline().train)
    assert sorted(written) == sorted(TRAIN_KEYS_BEFORE + TRAIN_KEYS_ADDED)
    assert {k: written[k] for k in ("late_layers", "tiers", "reduction", "tier_score", "lora_alpha")} == {
        "late_layers": 2, "tiers": [], "reduction": 0, "tier_score": "softmax-normed", "lora_alpha": 16.0}


def test_a_run_saved_with_every_method_key_in_its_spec_evaluates_and_resumes(tmp_path, full_cache, labeled_csv):  # noqa: F811
    """Before methods owned their settings, a UniPT run's model.json held SHERL's keys too."""
    from sherl_pipe.evaluation import evaluate

    backbone, cache = full_cache
    path = write_full_pipeline(tmp_path / "p.toml", backbone, labeled_csv, cache, tmp_path / "run",
                               'dtype = "float32"\nlate_layers = 0', 'method = "unipt"\nepochs = 2\neval_split = ""')
    pipe = load_pipeline(str(path))
    stop = iter(range(100))
    assert train(pipe, log=lambda m: None, should_stop=lambda: next(stop) >= 3).stop_reason == "interrupted"
    before = {"late_layers": 0, "tiers": [], "projection": "gated-mlp", "late_tuning": "frozen", "lora_rank": 8,
              "lora_alpha": 16.0}
    run = tmp_path / "run"
    info = json.loads((run / "model.json").read_text())
    info["spec"].update(before)
    (run / "model.json").write_text(json.dumps(info))
    state = torch.load(run / "checkpoints" / "state.pt", weights_only=False)
    state["spec"].update(before)
    torch.save(state, run / "checkpoints" / "state.pt")
    assert evaluate(run, "test", checkpoint="last")["rows"] > 0
    assert train(pipe, resume=True, log=lambda m: None).epochs_done == 2


@dataclass(frozen=True)
class DeepOptions(Options):
    late_layers: int = between(4, 1, 12)  # a key SHERL has too, with another default


class Deep(EveryTier):
    name = "deep"
    Options = DeepOptions


def test_a_later_layer_wins_over_a_table_below_it(tmp_path):
    """The override order holds for a method's table too: a --set, a command option or a swept
    value of a key beats the file's [train.<method>] value (old code: the table won, so a sweep
    over late_tuning trained every trial alike)."""
    path = tmp_path / "p.toml"
    path.write_text('[train]\nmethod = "sherl"\n[train.sherl]\nlate_tuning = "frozen"\nlate_layers = 1\n')
    assert load_pipeline(str(path), ["train.late_tuning=full"]).train.options.late_tuning == "full"
    pipe = load_pipeline(str(path)).with_overrides("train", late_tuning="lora")
    assert (pipe.train.options.late_tuning, pipe.train.options.late_layers) == ("lora", 1)
    assert quickstart("train.sherl.late_layers=1", "train.late_layers=2").train.options.late_layers == 2


def test_a_sweep_trial_trains_the_swept_value_over_the_pipelines_table(tmp_path):
    import optuna

    from sherl_pipe.engine import Coordinator
    from sherl_pipe.sweep.space import Param
    from types import SimpleNamespace

    path = tmp_path / "p.toml"
    path.write_text('[train]\nmethod = "sherl"\n[train.sherl]\nlate_tuning = "frozen"\n')
    c = object.__new__(Coordinator)
    c.plan = SimpleNamespace(pipeline=load_pipeline(str(path)), params=[Param("late_tuning", "categorical", ("full",))],
                             sweep_dir=tmp_path / "sweep", metric="accuracy", cache_fingerprint="f", keep="best")
    c.engine, c.prefix, c.decide = SimpleNamespace(threads=1), "p", False
    spec = c.trial_spec(optuna.trial.FixedTrial({"late_tuning": "full"}))
    assert Pipeline.from_dict(spec["pipeline"], "trial").train.options.late_tuning == "full"


def test_a_settings_round_trip_keeps_a_methods_own_defaults(monkeypatch):
    """Handed on (a command option, --set, a trial), the settings are those given: the built-in
    methods' defaults written out would read as given, and a method of one's own with another
    default for a key of that name would get SHERL's (old code: late_layers 2 instead of 4)."""
    from sherl_pipe.config import apply_overrides

    monkeypatch.setitem(REGISTRY, "deep", Deep)
    pipe = quickstart("train.method=deep")
    assert pipe.train.options.late_layers == 4
    assert pipe.with_overrides("train", epochs=1).train.options.late_layers == 4
    assert apply_overrides(pipe, ["train.epochs=1"]).train.options.late_layers == 4
    assert Pipeline.from_dict(pipe.to_dict(secrets=True, given=True), "hand-over").train.options.late_layers == 4


@pytest.mark.parametrize("text, message", [
    ('[train]\nflat = 1\n', r"unknown key 'train.flat'"),
    ('[train]\n[train.tables]\nbogus = 1\n', r"unknown key 'train.tables'"),
])
def test_the_internal_keys_are_refused_from_a_file(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(SherlError, match=message):
        load_pipeline(str(path))
