"""sherl-pipe sweep: trials on a 2-worker dask LocalCluster over one cache, failures and pruning
recorded, a killed sweep resumed, bad sweep files refused before any trial starts."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import one_error_line, write_full_pipeline
from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError


def sweep_pipeline(tmp_path, bert_dir, labeled_csv, cache, sweep_table, train_extra="epochs = 2"):
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, cache, tmp_path / "run",
                               'dtype = "float32"', f'{train_extra}\neval_split = "validation"')
    path.write_text(path.read_text() + "\n" + sweep_table.replace("{dir}", str(tmp_path / "sweep")))
    return path


def rows(sweep_dir):
    with open(sweep_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


GRID = """
[sweep]
sampler = "grid"
dir = "{dir}"
workers = 1
threads = 1
[sweep.space]
lr = [0.001, 0.003]
"""


def test_trials_equal_sherl_pipe_train_and_fresh_processes(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Two trials run in a row in one worker process; each equals `sherl-pipe train` of the same
    settings run in a fresh process."""
    from sherl_pipe.sweep import run_sweep

    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID, "epochs = 2\ndropout = 0.1")
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


def failing_trial(spec):
    """Trial 1 raises; trial 2's worker process dies."""
    from sherl_pipe.sweep.trial import run_trial

    if spec["number"] == 1:
        raise RuntimeError("this trial breaks")
    if spec["number"] == 2:
        os._exit(1)
    return run_trial(spec)


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


def test_a_pruned_trial_is_recorded_with_its_epoch(tmp_path, bert_dir, labeled_csv, fp32_cache, monkeypatch):
    import optuna

    import sherl_pipe.sweep.study as study_mod
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


def test_a_resumed_random_search_draws_new_settings(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Rerun with a larger budget, a random search seeded with sweep.seed alone drew trial 0's
    settings again for every new trial (the sampler started its sequence over)."""
    from sherl_pipe.sweep import run_sweep

    table = ('[sweep]\nsampler = "random"\ntrials = 2\ndir = "{dir}"\nworkers = 1\nthreads = 1\n'
             '[sweep.space]\nlr = {low = 0.0001, high = 0.01, log = true}\n')
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1\nmax_steps = 2")
    run_sweep(load_pipeline(str(path)), log=lambda m: None)
    run_sweep(load_pipeline(str(path), ["sweep.trials=4"]), log=lambda m: None)
    lrs = [r["lr"] for r in rows(tmp_path / "sweep")]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from optuna.trial import TrialState

    from sherl_pipe.sweep.study import load_study

    table = '[sweep]\nsampler = "grid"\ndir = "{dir}"\nworkers = 2\nthreads = 1\n[sweep.space]\nseed = [0, 1, 2]\n'
    # 40 epochs: a trial takes seconds (8 took under one), far longer than from the poll to the kill
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 40")
    proc = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "sweep", "-q", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    journal = tmp_path / "sweep" / "study.journal"
    deadline, complete = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file():
            try:
                study = load_study(tmp_path / "sweep")
            except SherlError:  # the journal is there, the study not yet
                time.sleep(0.3)
                continue
            complete = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
            # trials 0 and 1 start together on the 2 workers and end within moments of each other,
            # so trial 1 seen running may finish before the kill (then nothing is interrupted);
            # trial 2 starts when one of them ends and is surely mid-run at the kill
            if complete and any(t.number >= 2 for t in study.get_trials(states=(TrialState.RUNNING,))):
                break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stderr.read().decode()
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    os.kill(proc.pid, signal.SIGKILL)  # the sweep alone: its workers follow it
    proc.wait()
    assert workers and not psutil.wait_procs(workers, timeout=30)[1]
    finished = {n: (tmp_path / "sweep" / "trials" / f"{n:04d}" / "trial.json").stat().st_mtime_ns for n in complete}
    r = CliRunner().invoke(main, ["sweep", str(path), "-q"])
    assert r.exit_code == 0, r.output
    got = {int(x["number"]): x for x in rows(tmp_path / "sweep")}
    for n, mtime in finished.items():  # not rerun
        assert (tmp_path / "sweep" / "trials" / f"{n:04d}" / "trial.json").stat().st_mtime_ns == mtime
    interrupted = [x for x in got.values() if x["state"] == "failed"]
    assert interrupted and all(x["error"].startswith("interrupted") for x in interrupted)
    assert sorted(x["seed"] for x in got.values() if x["state"] == "complete") == ["0", "1", "2"]


@pytest.mark.parametrize("table, message", [
    ('[sweep]\n[sweep.space]\nextract = {dtype = ["float32"]}\n', r"sweep.space.extract: only train settings vary"),
    ('[sweep]\n[sweep.space]\nrun_dir = ["a", "b"]\n', r"a trial cannot vary train.run_dir"),
    ('[sweep]\n[sweep.space]\nlearning_rate = [0.1]\n', r"sweep.space.learning_rate: not a train setting"),
    ('[sweep]\n[sweep.space]\nlate_tuning = ["frozen", "bogus"]\n',
     r"sweep.space.late_tuning = 'bogus': .*is not one of"),
    ('[sweep]\n[sweep.space]\npooling = {low = 1, high = 2}\n', r"a range needs a numeric setting"),
    ('[sweep]\nsampler = "grid"\n[sweep.space]\nlr = {low = 0.001, high = 0.01}\n',
     r"sampler = 'grid' needs lists of values"),
    ('[sweep]\n[sweep.space]\nlate_layers = [1, 4]\n', r"late_layers = 4 .*the cache cannot serve it"),
    ('[sweep]\n[sweep.space]\ntiers = [[0, 7]]\n',
     r"sweep.space: train.late_layers = 1 \(not swept\) with tiers = \[0, 7\]: the cache cannot serve it"),
    ('[sweep]\nmetric = "pearson"\n[sweep.space]\nlr = [0.1]\n', r"sweep.metric = 'pearson' is not a classification"),
    ('[sweep]\ntrials = 0\n[sweep.space]\nlr = [0.1]\n', r"sweep.trials = 0 means every combination"),
    ('[sweep]\npruner = "hyperband"\n[sweep.space]\nlr = [0.1]\n', r"sweep.pruner = 'hyperband' is not one of"),
    ('[sweep]\nmetric = "accuracy"\n', r"\[sweep.space\] is missing or empty"),
])
def test_bad_sweep_files_are_refused_before_any_trial(tmp_path, bert_dir, labeled_csv, fp32_cache, table, message):
    from sherl_pipe.sweep import plan_sweep

    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table)
    with pytest.raises(SherlError, match=message):
        plan_sweep(load_pipeline(str(path)), None, None)
    r = CliRunner().invoke(main, ["sweep", str(path), "-q"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("table, message", [
    ('[sweep]\n[sweep.space]\nlearning_rate = [0.1]\n', r"sweep.space.learning_rate: not a train setting"),
    ('[sweep]\n[sweep.space]\nlate_layers = [1, 4]\n', r"late_layers = 4 .*the cache cannot serve it"),
    ('[sweep]\n[sweep.space]\ntiers = [[0, 7]]\n', r"tiers = \[0, 7\]: the cache cannot serve it"),
    ('[sweep]\nmetric = "pearson"\n[sweep.space]\nlr = [0.1]\n', r"sweep.metric = 'pearson' is not a classification"),
    ('[sweep]\n[sweep.space]\nlr = [0.1]\n', r"train.eval_split = 'dev': cache \S+ has no such split"),
])
def test_bad_sweep_files_are_refused_before_the_cache_is_made(tmp_path, bert_dir, labeled_csv, table, message):
    """`sherl-pipe sweep` without a cache extracts first; a bad sweep file used to be found only
    after that extraction (which on real data takes many minutes)."""
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, tmp_path / "cache", table)
    sets = ["--set", "train.eval_split=dev"] if "eval_split = 'dev'" in message else []
    r = CliRunner().invoke(main, ["sweep", str(path), "-q", *sets])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert re.search(message, r.stderr) and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "sweep").exists()


def test_a_changed_space_is_refused_unless_overwrite(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from sherl_pipe.sweep import run_sweep

    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID, "epochs = 1")
    run_sweep(load_pipeline(str(path)), log=lambda m: None)
    changed = load_pipeline(str(path), ["sweep.sampler=random", "sweep.trials=1"])
    with pytest.raises(SherlError, match=r"holds a sweep with another sampler; .*--overwrite"):
        run_sweep(changed, log=lambda m: None)
    assert len(rows(tmp_path / "sweep")) == 2
    run_sweep(changed, overwrite=True, log=lambda m: None)
    assert len(rows(tmp_path / "sweep")) == 1
    r = CliRunner().invoke(main, ["sweep-report", str(tmp_path / "sweep")])
    assert r.exit_code == 0 and "1 trials: 1 complete" in r.output, r.output


def test_a_report_on_a_sweep_whose_study_is_not_written_yet_is_one_error_line(tmp_path):
    """The sweep creates its journal a moment before it writes the study into it: a report (or the
    kill test's polling) in between got optuna's bare KeyError."""
    from sherl_pipe.sweep.study import JOURNAL, load_study

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / JOURNAL).write_bytes(b"")
    with pytest.raises(SherlError, match=r"sweep folder .*sweep: study.journal holds no study yet"):
        load_study(tmp_path / "sweep")
    r = CliRunner().invoke(main, ["sweep-report", str(tmp_path / "sweep")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.output


def test_a_sweep_leaves_dasks_configuration_as_it_found_it(tmp_path):
    """In a fresh interpreter (distributed not yet imported), entering and leaving the sweep's
    cluster once dropped distributed's configuration: the next sweep in the process failed."""
    script = tmp_path / "twice.py"
    script.write_text(
        "import dask\n"
        "from sherl_pipe.sweep.engine import engine\n"
        "from sherl_pipe.sweep.config import SweepConfig\n"
        "if __name__ == '__main__':\n"
        "    for _ in range(2):\n"
        "        with engine(SweepConfig(workers=1), None) as eng:\n"
        "            assert eng.workers == 1\n"
        "        assert 'comm' in dask.config.get('distributed')\n"
        "    print('ok')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_local_cluster_does_not_claim_dasks_dashboard_port(tmp_path):
    """Two sweeps at once (or a sweep beside another dask cluster): the second's scheduler found
    port 8787 taken and warned "Perhaps you already have a cluster running?"."""
    import socket
    import warnings

    from sherl_pipe.sweep.engine import engine
    from sherl_pipe.sweep.config import SweepConfig

    with socket.socket() as taken:
        try:
            taken.bind(("", 8787))
        except OSError:
            pass  # somebody holds it already: the case under test either way
        taken.listen()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with engine(SweepConfig(workers=1), None) as eng:
                assert eng.workers == 1
    assert not [w for w in seen if "8787" in str(w.message)], [str(w.message) for w in seen]


def test_the_sweep_command_compares_the_cache_with_the_pipeline_once(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                                      monkeypatch):
    """The command checks the cache (and extracts only if it must); the sweep then skips the check."""
    import sherl_pipe.request as request
    import sherl_pipe.sweep as sweep

    reads, calls = [], []
    real_read = request.read_request
    monkeypatch.setattr(request, "read_request", lambda p: (reads.append(1), real_read(p))[1])

    def fake_run_sweep(pipe, *args, **kwargs):
        calls.append(kwargs)
        if kwargs.get("check_cache", True):
            request.check_cache_matches(__import__("sherl_pipe.cache", fromlist=["Cache"]).Cache(pipe.extract.cache),
                                        pipe)
        raise SystemExit(0)

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID)
    out = CliRunner().invoke(main, ["sweep", "-q", str(path)])
    assert out.exit_code == 0, out.output
    assert "complete, matches the pipeline" in out.output
    assert calls and calls[0].get("check_cache") is False and len(reads) == 1


def scripted_trial(spec):
    """Epoch values from the trial's lr and seed (SCRIPT), through the real Reporter: the sweep's
    bookkeeping without training."""
    from sherl_pipe.sweep.trial import Reporter
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


def test_results_say_what_they_mean(tmp_path, bert_dir, labeled_csv, fp32_cache, monkeypatch):
    """A pruned trial's value is its best epoch's (Optuna keeps the last); a trial pruned at its
    final epoch is complete; a metric NaN at every epoch fails with a reason (Optuna failed it with
    none while the log said done); a NaN epoch before a finite one does not spoil the trial."""
    import cloudpickle
    import optuna

    import sherl_pipe.sweep.study as study_mod
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


def test_a_trial_whose_decision_does_not_come_carries_on(monkeypatch):
    """The prune-decision timeout failed the trial (TimeoutError) while the comment said it carries on."""
    from distributed import Client

    import sherl_pipe.sweep.trial as trial

    monkeypatch.setattr(trial, "DECISION_TIMEOUT", 0.3)
    spec = {"number": 0, "metric": "accuracy", "reports": "r-test", "decisions": "d-test", "decide": True}
    record = {"epoch": 1, "complete": True, "final": False, "train_loss": 1.0, "eval": {"accuracy": 0.5}}
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0"):
        trial.Reporter(spec)(record)  # no one answers: returns


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
                "decide": False, "stop": "stop", "cache_fingerprint": fingerprint}

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


def test_an_empty_or_cut_journal_is_resumed_not_refused(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A disk that filled as the sweep began left an empty study.journal, refused as a sweep 'with
    another space'; one cut off mid-record was read, then made unreadable by the next record."""
    from sherl_pipe.sweep import run_sweep
    from sherl_pipe.sweep.study import load_study

    table = ('[sweep]\nsampler = "random"\ntrials = 1\ndir = "{dir}"\nworkers = 1\nthreads = 1\n'
             '[sweep.space]\nlr = {low = 0.0001, high = 0.01, log = true}\n')
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, "epochs = 1\nmax_steps = 2")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "study.journal").write_bytes(b"")
    run_sweep(load_pipeline(str(path)), log=lambda m: None)
    with open(tmp_path / "sweep" / "study.journal", "ab") as f:
        f.write(b'{"op_code": 4, "worker_id": "x", "study_id": 0, "dat')  # killed mid-record
    lines = []
    run_sweep(load_pipeline(str(path), ["sweep.trials=2"]), log=lines.append)
    assert any("dropped a partial last record of study.journal" in line for line in lines)
    assert [t.state.name for t in load_study(tmp_path / "sweep").get_trials()] == ["COMPLETE", "COMPLETE"]


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


def test_a_sweep_folder_from_before_new_train_keys_still_resumes(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A sweep saved by an earlier sherl-pipe has no train.metric or train.tier_score in its
    signature: it resumes with the values it ran with, and says which key differs otherwise."""
    from sherl_pipe.sweep import run_sweep
    from sherl_pipe.sweep.study import load_study

    table = ('[sweep]\nsampler = "random"\ntrials = 1\ndir = "{dir}"\nworkers = 1\nthreads = 1\n'
             '[sweep.space]\nlr = {low = 0.0001, high = 0.01, log = true}\n')
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table, 'epochs = 1\nmax_steps = 2\n'
                          'tier_score = "relu"')
    run_sweep(load_pipeline(str(path)), log=lambda m: None)
    study = load_study(tmp_path / "sweep")
    old = json.loads(json.dumps(study.user_attrs["signature"]))
    for key in ("metric", "tier_score"):
        del old["pipeline"]["train"][key]
    study.set_user_attr("signature", old)
    assert run_sweep(load_pipeline(str(path), ["sweep.trials=2"]), log=lambda m: None).report.rows[1]["state"] == (
        "complete")
    with pytest.raises(SherlError, match=r"another pipeline \(train.tier_score: sweep has 'relu', request has "
                                         r"'softmax-normed'\)"):
        run_sweep(load_pipeline(str(path), ["train.tier_score=softmax-normed", "sweep.trials=3"]), log=lambda m: None)


def interrupted_trial(spec):
    """A trial that runs until the sweep is told to stop, then ends 'interrupted'."""
    time.sleep(1.0)
    return {"state": "interrupted", "values": []}


def test_a_second_ctrl_c_during_a_trials_bookkeeping_still_records_every_trial(tmp_path, bert_dir, labeled_csv,
                                                                               fp32_cache, monkeypatch):
    """The second Ctrl-C raised KeyboardInterrupt wherever the coordinator was: after a finished
    trial was taken off the running set and before it was recorded, it stayed 'running' in the
    study and was queued for no rerun (seen under load: test_sweep_faults' double Ctrl-C)."""
    import cloudpickle

    import sherl_pipe.sweep.run as run_mod
    from sherl_pipe.sweep import run_sweep
    from sherl_pipe.sweep.report import build_report

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    real_run_again, calls = run_mod.run_again, []

    def run_again_cut(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the second Ctrl-C arrives in the middle of the first trial's record
            os.kill(os.getpid(), signal.SIGINT)
        return real_run_again(*args, **kwargs)

    monkeypatch.setattr(run_mod, "run_again", run_again_cut)
    asked = []
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID.replace("workers = 1", "workers = 2"))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a Ctrl-C raises, as the CLI's second
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(load_pipeline(str(path)), log=lambda m: None, trial_fn=interrupted_trial,
                      should_stop=lambda: asked.append(1) or len(asked) > 1)  # stop once both were submitted
    finally:
        signal.signal(signal.SIGINT, previous)
    got = build_report(tmp_path / "sweep", plots=False).rows
    assert [r["state"] for r in got] == ["failed", "failed", "waiting", "waiting"], got
    assert sorted(r["lr"] for r in got[2:]) == [0.001, 0.003]


def test_a_sweep_ranking_trials_on_the_test_split_is_refused(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """train.eval_split = evaluate.split: the test rows would rank the trials and pick each one's
    best epoch; refused in one line naming both keys, before any trial (and before any extraction)."""
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, '[sweep]\n[sweep.space]\nlr = [0.1]\n')
    for cache in (str(fp32_cache), str(tmp_path / "new-cache")):
        r = CliRunner().invoke(main, ["sweep", str(path), "-q", "--set", "train.eval_split=test",
                                      "--set", f"extract.cache={cache}"])
        one_error_line(r, "train.eval_split = 'test'", "evaluate.split", "validation split")
        assert not (tmp_path / "sweep").exists() and not (tmp_path / "new-cache").exists()


def _fails(spec):
    raise RuntimeError("the cache's chunk h1/3/0 is damaged")


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
