"""what a sweep's results say: pruned and failed trials, non-finite values, best.toml over seeds."""

from __future__ import annotations

import pytest

import sys

from sweep_helpers import GRID, rows, sweep_pipeline

from sherl_pipe.config import load_pipeline


@pytest.mark.slow
def test_a_pruned_trial_is_recorded_with_its_epoch(tmp_path, bert_dir, labeled_csv, fp32_cache, monkeypatch):
    import optuna

    import sherl_pipe.sweep.search as study_mod
    from sherl_pipe.sweep import run_sweep

    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    monkeypatch.setattr(study_mod, "make_pruner", lambda cfg: PruneTrialOne())
    table = GRID.replace("sampler = \"grid\"", "sampler = \"grid\"\npruner = \"median\"")
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 3")
    run_sweep(load_pipeline(str(path)), log=lambda m: None)
    got = {int(r["number"]): r for r in rows(tmp_path / "sweep")}
    assert got[0]["state"] == "complete" and got[0]["epochs"] == "3"
    assert got[1]["state"] == "pruned" and got[1]["epochs"] == "1"


def scripted_trial(spec):
    """Epoch values from the trial's lr and seed (SCRIPT), through the real Reporter: the sweep's
    bookkeeping without training."""
    from sherl_pipe.engine import Reporter
    from sherl_pipe.training.loop import StopTraining

    train_cfg = spec["pipeline"]["train"]
    values = SCRIPT[(train_cfg["lr"], train_cfg["seed"])]
    reporter, state = Reporter(spec), "complete"
    for i, v in enumerate(values):
        record = {"epoch": i + 1, "complete": True, "final": i == len(values) - 1, "train_loss": 1.0,
                  "eval": {"accuracy": v}}
        try:
            reporter(record)
        except StopTraining:
            state = "pruned"
            break
    return {"number": spec["number"], "state": state, "values": reporter.values}


NAN = float("nan")


SCRIPT = {(0.001, 0): [0.5, 0.6, 0.7], (0.002, 0): [0.7, 0.5, 0.6], (0.003, 0): [NAN, NAN, NAN],
          (0.004, 0): [NAN, 0.6, 0.55],
          (0.001, 1): [0.9], (0.001, 2): [0.1], (0.002, 1): [0.6], (0.002, 2): [0.6]}


@pytest.mark.slow
def test_results_say_what_they_mean(tmp_path, bert_dir, labeled_csv, fp32_cache, monkeypatch):
    """A pruned trial's value is its best epoch's (Optuna keeps the last); a trial pruned at its
    final epoch is complete; a metric NaN at every epoch fails with a reason (Optuna failed it with
    none while the log said done); a NaN epoch before a finite one does not spoil the trial."""
    import cloudpickle
    import optuna

    import sherl_pipe.sweep.search as study_mod
    from sherl_pipe.sweep import run_sweep

    class Scripted(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return (trial.params["lr"], trial.last_step) in {(0.001, 3), (0.002, 2)}

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(study_mod, "make_pruner", lambda cfg: Scripted())
    table = GRID.replace('sampler = "grid"', 'sampler = "grid"\npruner = "median"').replace(
        "lr = [0.001, 0.003]", "lr = [0.001, 0.002, 0.003, 0.004]")
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table.replace("workers = 1", "workers = 2"))
    lines = []
    run_sweep(load_pipeline(str(path)), log=lines.append, trial_fn=scripted_trial)
    got = {r["lr"]: r for r in rows(tmp_path / "sweep")}
    assert (got["0.001"]["state"], got["0.001"]["value"]) == ("complete", "0.7")  # not pruned at its last epoch
    assert (got["0.002"]["state"], got["0.002"]["value"]) == ("pruned", "0.7")  # its best epoch, not its last
    assert got["0.003"]["state"] == "failed" and "accuracy was not finite at any epoch" in got["0.003"]["error"]
    assert any(line.startswith(f"trial {got['0.003']['number']} failed: accuracy was not finite") for line in lines)
    assert (got["0.004"]["state"], got["0.004"]["value"]) == ("complete", "0.6")


@pytest.mark.slow
def test_best_toml_is_the_best_setting_over_seeds_not_the_luckiest_seed(tmp_path, bert_dir, labeled_csv,
                                                                       fp32_cache):
    import cloudpickle

    from sherl_pipe.sweep import run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    table = GRID.replace("lr = [0.001, 0.003]", "lr = [0.001, 0.002]\nseed = [1, 2]")
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1\nseed = 7")
    result = run_sweep(load_pipeline(str(path)), log=lambda m: None, trial_fn=scripted_trial)
    best = load_pipeline(str(tmp_path / "sweep" / "best.toml"))
    assert (best.train.lr, best.train.seed) == (0.002, 7)  # mean 0.6 beats 0.9 and 0.1's mean 0.5
    assert result.report.best["lr"] == 0.002
    assert "best.toml: the setting with the best mean over seeds" in result.report.leaderboard
    assert (tmp_path / "sweep" / "best.toml").read_text().startswith("# The best setting by mean accuracy over 2 seed")


def preset_trial(spec):
    """One epoch, accuracy 0.8 for the accuracy preset (0.6 otherwise): the sweep's bookkeeping
    without training."""
    from sherl_pipe.engine import Reporter

    train_cfg = spec["pipeline"]["train"]
    preset = {**train_cfg.get("flat", {}), **train_cfg}.get("preset", "memory")
    reporter = Reporter(spec)
    reporter({"epoch": 1, "complete": True, "final": True, "train_loss": 1.0,
              "eval": {"accuracy": 0.8 if preset == "accuracy" else 0.6}})
    return {"number": spec["number"], "state": "complete", "values": reporter.values}


@pytest.mark.slow
def test_best_toml_of_a_swept_preset_trains_what_its_trial_trained(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """best.toml laid the best values over the pipeline as written, where every key stands at its
    default as if given: a winning accuracy preset came out as late_tuning frozen and the shut start
    (old code), while its trial had trained full with the open start. A key the pipeline gives
    (late_layers = 1 here) still wins over the preset."""
    import cloudpickle

    from sherl_pipe.sweep import run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    table = GRID.replace("lr = [0.001, 0.003]", 'preset = ["memory", "accuracy"]')
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1")
    result = run_sweep(load_pipeline(str(path)), log=lambda m: None, trial_fn=preset_trial)
    assert result.report.best["preset"] == "accuracy"
    best = load_pipeline(str(tmp_path / "sweep" / "best.toml")).train.options
    assert (best.preset, best.late_tuning, best.anchor_residual, best.late_layers) == ("accuracy", "full", "open", 1)
