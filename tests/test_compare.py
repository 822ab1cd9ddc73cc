"""sherl-pipe compare: methods x seeds as trials of the sweep engine, each in a process of its own,
at equal epochs or at full fine-tuning's time; compare.csv, compare.md, the plots, and a report
rebuilt from the folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_backbone, write_full_pipeline
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.extraction import extract


@pytest.fixture(scope="module")
def compare_pipeline(tmp_path_factory, labeled_csv):
    root = tmp_path_factory.mktemp("compare")
    backbone = make_backbone(root / "backbone", "bert", dropout=0.0)
    path = write_full_pipeline(root / "p.toml", backbone, labeled_csv, root / "cache", root / "run",
                               'dtype = "float32"\nlate_layers = 0', 'epochs = 1\neval_split = "validation"')
    extract(load_pipeline(str(path)))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_at_equal_epochs_writes_the_table_and_the_pictures(tmp_path, compare_pipeline):
    out = tmp_path / "cmp"
    args = ["compare", str(compare_pipeline), "-q", "--methods", "sherl,linear-probe,full-finetune", "--seeds", "2",
            "--live-seeds", "1", "--compare-dir", str(out), "--workers", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "compare.csv")
    assert [(x["method"], x["seed"]) for x in rows] == [("sherl", "0"), ("sherl", "1"), ("linear-probe", "0"),
                                                        ("linear-probe", "1"), ("full-finetune", "0")]
    for x in rows:
        assert x["state"] == "complete" and 0 <= float(x["test"]) <= 1 and x["epochs"] == "1"
        assert float(x["seconds"]) > 0 and float(x["peak_mib"]) >= 0 and x["batch"]
    size = {x["method"]: int(x["trainable_parameters"]) for x in rows}
    assert size["linear-probe"] < size["sherl"] < size["full-finetune"]
    state = {x["method"]: float(x["state_mib"]) for x in rows}
    assert state["linear-probe"] < state["full-finetune"] and state["sherl"] < state["full-finetune"]
    table = (out / "compare.md").read_text()
    assert "| sherl | 2 |" in table and "− full-finetune (paired bootstrap 95%)" in table and "| full-finetune | 1 |" in table
    assert "| sherl | 2 |" in r.stdout
    for name in ("accuracy_vs_memory.png", "accuracy_vs_time.png"):
        assert (out / name).stat().st_size > 1000
    # the test metric is the best epoch's, on the evaluate split, as `sherl-pipe evaluate` gives it
    first = json.loads((out / "final" / "jobs" / "0000" / "result.json").read_text())  # sherl, seed 0: asked first
    assert first["test"]["metrics"]["accuracy"] == pytest.approx(float(rows[0]["test"]), abs=1e-6)
    (out / "compare.md").unlink()
    r = CliRunner().invoke(main, ["compare-report", str(out)])
    assert r.exit_code == 0 and (out / "compare.md").read_text() == table
    again = CliRunner().invoke(main, args)  # resumed: nothing left to run, the same table
    assert again.exit_code == 0 and (out / "compare.md").read_text() == table


def test_compare_at_equal_time_gives_each_method_the_epochs_that_fit(tmp_path, compare_pipeline):
    from sherl_pipe.compare import compare

    pipe = load_pipeline(str(compare_pipeline), ["train.epochs=2"])
    out = compare(pipe, ["sherl"], seeds=1, budget="time", compare_dir=str(tmp_path / "cmp"), workers=2,
                  log=lambda m: None)
    plan = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert plan["methods"] == ["sherl", "full-finetune"] and plan["epochs"]["full-finetune"] == 2
    calib = {}
    for job in (tmp_path / "cmp" / "calibrate" / "jobs").iterdir():
        method = json.loads((job / "spec.json").read_text())["pipeline"]["train"]["method"]
        calib[method] = json.loads((job / "result.json").read_text())
    want = int(np.clip(np.floor(calib["full-finetune"]["train_seconds"] / calib["sherl"]["train_seconds"]), 1, 100))
    assert plan["epochs"]["sherl"] == want
    rows = {x["method"]: x for x in out["rows"]}
    assert rows["sherl"]["epochs"] == want and rows["full-finetune"]["epochs"] == 2  # its calibration runs


def test_a_killed_phase_reruns_the_trials_it_left_running(tmp_path):
    """A compare killed while trials ran that had not drawn their parameters yet: resumed, those
    trials were counted as held and never ran again, and the phase filled its count with sampled
    settings (another method, seed or rate) in their place."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from sherl_pipe.compare.phase import open_phase
    from sherl_pipe.config import load_pipeline

    c = SimpleNamespace(pipeline=load_pipeline("quickstart"), metric="accuracy", direction="maximize")
    planned = [{"method": m, "seed": s, "epochs": 3, "lr": 0.001} for m in ("sherl", "linear-probe") for s in (0, 1)]
    study, _ = open_phase(c, tmp_path, planned)
    running = study.ask()  # taken from the queue; killed before it drew its parameters
    study, _ = open_phase(c, tmp_path, planned)  # the rerun
    assert study.get_trials(deepcopy=False)[running.number].state == TrialState.FAIL
    waiting = [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))]
    assert sorted(map(str, waiting)) == sorted(map(str, planned))
