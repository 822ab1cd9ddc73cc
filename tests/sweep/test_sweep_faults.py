"""A sweep interrupted the ways users interrupt it, on a 2-worker LocalCluster in a process of its
own: Ctrl-C (sent to the whole process group, as a terminal does), Ctrl-C twice, SIGKILL of a
worker, SIGKILL of the sweep, and a second sweep started on the same folder. Each ends with every
grid point complete once the same command is rerun: trials cut off are recorded as interrupted or
lost (told apart from trials that raised) and run again; none is lost."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import write_full_pipeline

LRS = ["0.001", "0.002"]
TABLE = """
[sweep]
sampler = "grid"
dir = "{dir}"
workers = 2
threads = 1
[sweep.space]
lr = [0.001, 0.002]
"""


@pytest.fixture()
def sweep_file(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Trials of a few seconds (batch size 1): long enough to be cut off while they train."""
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                               'dtype = "float32"', 'epochs = 8\nbatch_size = 1\neval_split = "validation"')
    path.write_text(path.read_text() + TABLE.replace("{dir}", str(tmp_path / "sweep")))
    return path


def start(path):
    """`sherl-pipe sweep` in a session of its own, so a signal to its group reaches its workers too."""
    return subprocess.Popen([sys.executable, "-m", "sherl_pipe", "sweep", "-q", str(path)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_training(sweep_dir, count: int, proc, timeout: float = 120) -> None:
    """Until COUNT trials have written their first train record (they are mid-epoch)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list((sweep_dir / "trials").glob("*/metrics.jsonl"))) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    pytest.fail("the trials did not start")


def workers_of(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def rows(sweep_dir) -> list[dict]:
    with open(sweep_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def error(sweep_dir, number) -> str:
    return (sweep_dir / "trials" / f"{int(number):04d}" / "error.txt").read_text()


def finish(path, sweep_dir) -> list[dict]:
    """Rerun the same command to the end: every grid point complete exactly once."""
    proc = start(path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got = rows(sweep_dir)
    assert sorted(r["lr"] for r in got if r["state"] == "complete") == LRS, got
    assert all(error(sweep_dir, r["number"]).startswith(("interrupted:", "lost:")) for r in got
               if r["state"] == "failed")
    return got


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_a_killed_worker_loses_no_trial(sweep_file, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start(sweep_file)
    wait_training(sweep_dir, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the sweep and its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("interrupt: no new trials"), err
    assert lines[1].startswith(f"interrupted: sweep {sweep_dir} stopped; 2 trial(s) recorded to run again")
    got = rows(sweep_dir)  # the workers were shielded: both trials stopped themselves, none died
    assert [r["state"] for r in got] == ["failed", "failed", "waiting", "waiting"], got
    assert all(error(sweep_dir, r["number"]).startswith("interrupted:") for r in got[:2])
    assert sorted(r["lr"] for r in got[:2]) == sorted(r["lr"] for r in got[2:]) == LRS  # queued to run again

    proc = start(sweep_file)  # resumed; one worker killed from outside mid-trial
    wait_training(sweep_dir, 4, proc)
    workers_of(proc)[0].kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    got = rows(sweep_dir)
    lost = [r for r in got if r["state"] == "failed" and error(sweep_dir, r["number"]).startswith("lost:")]
    assert len(lost) == 1, got
    assert sorted(r["lr"] for r in got if r["state"] == "complete") == LRS, got


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_still_records_the_trials(sweep_file, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start(sweep_file)
    wait_training(sweep_dir, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    from sherl_pipe.sweep.report import build_report

    got = build_report(sweep_dir, plots=False).rows  # a second Ctrl-C leaves at once, without a report
    assert [r["state"] for r in got] == ["failed", "failed", "waiting", "waiting"], got
    assert all(error(sweep_dir, r["number"]).startswith("interrupted:") for r in got[:2])
    finish(sweep_file, sweep_dir)


def test_a_second_sweep_on_a_locked_folder_is_refused_naming_the_holder(sweep_file, tmp_path):
    """Two sweeps on one folder: the second reran the first's live trials as interrupted and the
    first died telling a trial the second had failed. The lock is the kernel's (flock), so a killed
    holder's lock is free again (test above); lock.json names the holder."""
    from click.testing import CliRunner

    from sherl_pipe.cli import main
    from sherl_pipe.engine import prepare_folder

    sweep_dir = tmp_path / "sweep"
    (sweep_dir).mkdir()
    (sweep_dir / "study.journal").write_bytes(b"")
    lock = prepare_folder(sweep_dir, overwrite=False)
    try:
        r = CliRunner().invoke(main, ["sweep", "-q", str(sweep_file)])
    finally:
        lock.release()
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert f"sweep folder {sweep_dir}: another sherl-pipe sweep is running in it (pid {os.getpid()} on " in r.stderr
    assert not (sweep_dir / "trials").exists()


def _closes_its_worker(spec):
    """A trial whose worker leaves the cluster while it runs (and nothing replaces it)."""
    from distributed import get_worker

    worker = get_worker()
    worker.loop.add_callback(worker.close, executor_wait=False)
    time.sleep(2)
    return {}


@pytest.mark.slow
def test_a_sweep_whose_last_worker_is_gone_ends_with_an_error_not_finished(sweep_file, tmp_path, monkeypatch):
    """A cluster with one worker that dies and is never replaced: the lost trial is queued to run
    again, the loop waits for a worker, then ends with one line saying how many trials did not run
    (old code: it found no free worker, ended 'finished' and the command exited 0)."""
    from distributed import Client, LocalCluster

    import sherl_pipe.engine.coordinator as sweep_run
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.errors import SherlError
    from sherl_pipe.sweep import run_sweep

    monkeypatch.setattr(sweep_run, "ORPHAN_GRACE", 0.5)
    monkeypatch.setattr(sweep_run, "WORKER_WAIT", 2.0, raising=False)
    said = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        with pytest.raises(SherlError, match=r"2 trial\(s\) did not run: the cluster has had no worker for 2 s"):
            run_sweep(load_pipeline(str(sweep_file)), scheduler=cluster.scheduler_address, log=said.append,
                      trial_fn=_closes_its_worker)
    assert any("lost: its worker died; it runs again" in m for m in said), said
