"""a sweep resumed: a killed or interrupted sweep keeps its finished trials and reruns the others;
changed settings are refused; old and cut journals still resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from click.testing import CliRunner
from sweep_helpers import GRID, rows, sweep_pipeline

from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, bert_dir, labeled_csv, fp32_cache):
    from optuna.trial import TrialState

    from sherl_pipe.engine.study import load_study

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_an_empty_or_cut_journal_is_resumed_not_refused(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A disk that filled as the sweep began left an empty study.journal, refused as a sweep 'with
    another space'; one cut off mid-record was read, then made unreadable by the next record."""
    from sherl_pipe.engine.study import load_study
    from sherl_pipe.sweep import run_sweep

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


@pytest.mark.slow
def test_a_sweep_folder_from_before_new_train_keys_still_resumes(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """A sweep saved by an earlier sherl-pipe has no train.metric or train.tier_score in its
    signature: it resumes with the values it ran with, and says which key differs otherwise."""
    from sherl_pipe.engine.study import load_study
    from sherl_pipe.sweep import run_sweep

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


@pytest.mark.slow
def test_a_second_ctrl_c_during_a_trials_bookkeeping_still_records_every_trial(tmp_path, bert_dir, labeled_csv,
                                                                               fp32_cache, monkeypatch):
    """The second Ctrl-C raised KeyboardInterrupt wherever the coordinator was: after a finished
    trial was taken off the running set and before it was recorded, it stayed 'running' in the
    study and was queued for no rerun (seen under load: test_sweep_faults' double Ctrl-C)."""
    import cloudpickle

    import sherl_pipe.engine.coordinator as run_mod
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
