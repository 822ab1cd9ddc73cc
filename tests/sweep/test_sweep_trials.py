"""sweep trials: each equals `sherl-pipe train` with its settings, on fresh worker processes or a
cluster elsewhere; a failing trial or a dead worker fails alone; --retry-failed runs it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sweep_helpers import GRID, rows, sweep_pipeline

from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError


@pytest.mark.slow
def test_trials_equal_sherl_pipe_train_and_fresh_processes(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Two trials run in a row in one worker process; each equals `sherl-pipe train` of the same
    settings run in a fresh process."""
    from sherl_pipe.sweep import run_sweep

    grid = GRID.replace("threads = 1\n", "threads = 1\nkeep = \"all\"\n")  # the last epochs are compared
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, grid, "epochs = 2\ndropout = 0.1")
    result = run_sweep(load_pipeline(str(path)), log=lambda m: None)
    got = rows(tmp_path / "sweep")
    assert [r["state"] for r in got] == ["complete", "complete"] and result.threads == 1
    for r in got:
        run = tmp_path / f"fresh-{r['number']}"
        subprocess.run([sys.executable, "-m", "sherl_pipe", "train", "-q", str(path), "--run-dir", str(run),
                        "--set", f"train.lr={r['lr']}", "--set", "train.threads=1"], check=True, capture_output=True)
        a = load_file(tmp_path / "sweep" / "trials" / f"{int(r['number']):04d}" / "checkpoints" / "last.safetensors")
        b = load_file(run / "checkpoints" / "last.safetensors")
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
        # a trial skips the tier-weight pass (another read of the training split); train does it
        trial_summary = tmp_path / "sweep" / "trials" / f"{int(r['number']):04d}" / "summary.json"
        assert json.loads(trial_summary.read_text())["tier_weights"] is None
        # but the last epoch's consolidation state (measured in the evaluation's pass) is in trials.csv
        state = json.loads(trial_summary.read_text())["consolidation"]
        assert r["alive"] == "" and state["alive"] is None  # softmax-normed: no token can be dead
        assert float(r["entropy"]) == pytest.approx(state["entropy"], rel=1e-5) and 0 < state["entropy"] <= 1
        assert float(r["token_sd"]) == pytest.approx(state["token_sd"], rel=1e-5)
        assert float(r["alpha_sum"]) == pytest.approx(state["alpha_sum"], rel=1e-5)
        assert json.loads((run / "summary.json").read_text())["tier_weights"]["anchor"] == "h2"
    for name in ("best.toml", "leaderboard.txt", "metric_by_setting.png", "history.png", "learning_curves.png"):
        assert (tmp_path / "sweep" / name).is_file(), name
    best = load_pipeline(str(tmp_path / "sweep" / "best.toml"))
    assert best.train.lr == float(result.report.best["lr"]) and best.data.source == str(labeled_csv)


@pytest.mark.slow
def test_late_layers_and_tiers_vary_over_one_cache(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from sherl_pipe.sweep import run_sweep

    table = '[sweep]\nsampler = "grid"\ndir = "{dir}"\nworkers = 2\n[sweep.space]\nlate_layers = [1, 2]\ntiers = [[0], [0, 1]]\n'
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1")
    manifest = (fp32_cache / "zarr.json").stat().st_mtime_ns
    result = run_sweep(load_pipeline(str(path)), log=lambda m: None)
    got = rows(tmp_path / "sweep")
    assert {(r["late_layers"], r["tiers"]) for r in got} == {("1", "[0]"), ("1", "[0, 1]"), ("2", "[0]"),
                                                             ("2", "[0, 1]")}
    assert all(r["state"] == "complete" for r in got) and result.report.best is not None
    assert (fp32_cache / "zarr.json").stat().st_mtime_ns == manifest  # never re-extracted
    for trial in (tmp_path / "sweep" / "trials").iterdir():  # sweep.keep = "best", the default
        assert sorted(p.name for p in (trial / "checkpoints").iterdir()) == ["best.safetensors"]
        assert json.loads((trial / "trial.json").read_text())["freed_bytes"] > 0


def failing_trial(spec):
    """Trial 1 raises; trial 2's worker process dies."""
    from sherl_pipe.sweep.trial import run_trial

    if spec["number"] == 1:
        raise RuntimeError("this trial breaks")
    if spec["number"] == 2:
        os._exit(1)
    return run_trial(spec)


@pytest.mark.slow
def test_a_failing_trial_or_a_dead_worker_does_not_stop_the_sweep(tmp_path, bert_dir, labeled_csv, fp32_cache):
    import cloudpickle

    from sherl_pipe.sweep import run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    table = '[sweep]\nsampler = "random"\ntrials = 4\ndir = "{dir}"\nworkers = 2\n[sweep.space]\nlr = {low = 1e-4, high = 1e-2, log = true}\n'
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1")
    run_sweep(load_pipeline(str(path)), log=lambda m: None, trial_fn=failing_trial)
    got = {int(r["number"]): r for r in rows(tmp_path / "sweep")}
    # the dead worker's trial is told apart from one that raised, and runs again (not counted)
    assert len(got) == 5 and [got[n]["state"] for n in range(5)] == ["complete", "failed", "failed", "complete",
                                                                     "complete"]
    assert "RuntimeError: this trial breaks" in got[1]["error"]
    assert got[2]["error"].startswith("lost: the worker running this trial died")
    (rerun,) = [r for r in got.values() if r["rerun_of"] == "2"]
    assert rerun["lr"] == got[2]["lr"] and rerun["state"] == "complete"


def evaluation_less_trial(spec):
    """A trial that ends normally but never evaluated (no value for the study)."""
    return {"number": spec["number"], "state": "complete", "values": [], "final": None}


@pytest.mark.slow
def test_a_trial_that_ends_without_an_evaluation_is_said_to_have_failed(tmp_path, bert_dir, labeled_csv,
                                                                        fp32_cache):
    import cloudpickle

    from sherl_pipe.sweep import run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    lines = []
    run_sweep(load_pipeline(str(sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID))),
              log=lines.append, trial_fn=evaluation_less_trial)
    assert [r["state"] for r in rows(tmp_path / "sweep")] == ["failed", "failed"]
    said = [line for line in lines if "ended without an evaluation" in line]
    assert len(said) == 2 and all(line.startswith("trial ") and "failed" in line for line in said)


def test_two_trials_at_once_in_one_process_equal_each_alone(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Trials sharing a worker process (a multi-threaded worker) drew dropout masks from one global
    generator, so each differed from `sherl-pipe train` of its settings by ~1e-2; they run one at a
    time in a process (trial.TRIAL_LOCK) and equal separate runs."""
    import threading

    from distributed import Client

    from sherl_pipe.cache import Cache, manifest_fingerprint
    from sherl_pipe.sweep.trial import run_trial
    from sherl_pipe.training import train

    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID, "epochs = 2\ndropout = 0.3")
    base = load_pipeline(str(path))  # tmp_path: absolute paths
    fingerprint = manifest_fingerprint(Cache(fp32_cache).manifest)

    def spec(n, lr):
        pipe = base.to_dict()
        pipe["train"].update(lr=lr, run_dir=str(tmp_path / f"trial{n}"), threads=1)
        return {"number": n, "pipeline": pipe, "threads": 1, "metric": "accuracy", "reports": "r", "decisions": "d",
                "decide": False, "stop": "stop", "cache_fingerprint": fingerprint,
                "keep": "all"}  # their last weights are compared below

    errors = []
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"):
        threads = [threading.Thread(target=lambda s=spec(n, lr): errors.append(None) if run_trial(s) else None)
                   for n, lr in ((0, 0.001), (1, 0.003))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [None, None]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trials ran (a sum over threads rounds differently)
    try:
        for n, lr in ((0, 0.001), (1, 0.003)):
            train(base.with_overrides("train", lr=lr, run_dir=str(tmp_path / f"alone{n}")), log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    for n in (0, 1):
        a = load_file(tmp_path / f"trial{n}" / "checkpoints" / "last.safetensors")
        b = load_file(tmp_path / f"alone{n}" / "checkpoints" / "last.safetensors")
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_trials_on_a_cluster_elsewhere_read_the_sweeps_files(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                              monkeypatch):
    """A cluster whose worker runs in another directory, with another cache at the same relative
    path: trials resolved relative paths there and trained on that other cache without a word.
    Paths are made absolute by the sweep; a trial refuses a cache that is not the one checked."""
    import shutil

    from distributed import LocalCluster

    from sherl_pipe.sweep import run_sweep
    from sherl_pipe.sweep.trial import run_trial

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    (elsewhere / "cache").mkdir(parents=True)
    shutil.copytree(fp32_cache, home / "cache")
    monkeypatch.chdir(elsewhere)  # the worker starts here: it sees elsewhere/cache as "cache"
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0")
    try:
        monkeypatch.chdir(home)
        path = sweep_pipeline(home, bert_dir, labeled_csv, "cache", GRID.replace('"{dir}"', '"sweep"'), "epochs = 1")
        result = run_sweep(load_pipeline(str(path)), scheduler=cluster.scheduler_address, log=lambda m: None)
    finally:
        cluster.close()
    got = rows(home / "sweep")
    assert [r["state"] for r in got] == ["complete", "complete"], got
    for r in got:
        assert r["run_dir"].startswith(str(home / "sweep" / "trials"))
        assert json.loads((Path(r["run_dir"]) / "model.json").read_text())["cache"] == str(home / "cache")
    assert result.engine.startswith("the cluster at")
    spec = {"number": 9, "pipeline": json.loads((Path(got[0]["run_dir"]) / "config.json").read_text()),
            "threads": 1, "metric": "accuracy", "reports": "r", "decisions": "d", "decide": False, "stop": "s",
            "cache_fingerprint": "0" * 64}
    with pytest.raises(SherlError, match=r"sweep trial 9: the cache at .*home/cache on \S+ is not the one the sweep "
                                         r"checked"):
        run_trial(spec)


@pytest.mark.slow
def test_a_failing_trial_prints_no_dask_traceback(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A trial that raises (here: diverging at lr 1e30) is one line of the sweep's and its
    error.txt; the worker's "Compute Failed" record with the embedded traceback printed even under
    --quiet."""
    table = GRID.replace("lr = [0.001, 0.003]", "lr = [1e30]")
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1")
    out = subprocess.run([sys.executable, "-m", "sherl_pipe", "sweep", "-q", str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Compute Failed" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "train loss is nan" in rows(tmp_path / "sweep")[0]["error"]


def _fails(spec):
    raise RuntimeError("the cache's chunk h1/3/0 is damaged")


@pytest.mark.slow
def test_failed_trials_run_again_with_retry_failed(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A trial that failed (a damaged cache, since repaired) stayed failed: a rerun resumed past it
    and nothing short of --overwrite (losing every finished trial) ran it again."""
    from sherl_pipe.sweep import run_sweep

    table = '[sweep]\nsampler = "grid"\nworkers = 1\nthreads = 1\ndir = "{dir}"\n[sweep.space]\nlr = [0.001]\n'
    pipe = load_pipeline(str(sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "max_steps = 2")))
    run_sweep(pipe, log=lambda m: None, trial_fn=_fails)
    assert [r["state"] for r in rows(tmp_path / "sweep")] == ["failed"]
    run_sweep(pipe, log=lambda m: None)  # resumed: the budget is spent, the failure stays
    assert [r["state"] for r in rows(tmp_path / "sweep")] == ["failed"]
    said = []
    r = run_sweep(pipe, log=said.append, retry_failed=True)
    assert [x["state"] for x in rows(tmp_path / "sweep")] == ["failed", "complete"], rows(tmp_path / "sweep")
    assert "trials [0] failed before: they run again" in said and r.report.best["number"] == 1
    error = (tmp_path / "sweep" / "trials" / "0000" / "error.txt").read_text()
    assert error.startswith("retried: ") and "chunk h1/3/0 is damaged" in error
