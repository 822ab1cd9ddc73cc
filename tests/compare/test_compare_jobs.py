"""A compare trial's job process (compare/trial.py, compare/job.py): it ends with the worker that
started it, its stderr cannot fill a pipe and block it, and a stop that reaches it before it can
save its state makes the trial one to run again, not one that failed."""

from __future__ import annotations

import pytest

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

FAKE_JOB = """
import os, sys, time
from sherl_pipe.compare.job import Interrupted, end_with_parent
Interrupted()
end_with_parent(int(os.environ["SHERL_COMPARE_WORKER_PID"]))
sys.stderr.write("w" * 200_000)  # far past a pipe's 64 KiB
sys.stderr.flush()
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


def _worker_script(tmp_path, job: str) -> str:
    """A stand-in for a dask worker: run_compare_trial with the job replaced by JOB, no cluster."""
    (tmp_path / "job.py").write_text(job)
    return textwrap.dedent(f"""
        import sys
        import sherl_pipe.compare.trial as trial
        trial.StopFlag = lambda name: (lambda: False)
        trial.job_command = lambda spec: [sys.executable, {str(tmp_path / "job.py")!r}, {str(tmp_path / "pid")!r}]
        trial.run_compare_trial({{"number": 0, "threads": 1, "stop": "s",
                                  "pipeline": {{"train": {{"run_dir": {str(tmp_path / "c" / "trials" / "0000")!r},
                                                          "method": "sherl"}}}}}})
    """)


@pytest.mark.slow
def test_the_job_ends_with_its_worker_and_its_stderr_goes_to_a_file(tmp_path):
    """Old code: the job's stderr was a pipe read only at its end (a job that wrote 64 KiB blocked),
    and a job whose worker died went on training under pid 1."""
    worker = subprocess.Popen([sys.executable, "-c", _worker_script(tmp_path, FAKE_JOB)])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
            assert time.time() < deadline and worker.poll() is None, "the job blocked or never started"
            time.sleep(0.1)
        job = int((tmp_path / "pid").read_text())
        assert (tmp_path / "c" / "jobs" / "0000" / "stderr.txt").stat().st_size == 200_000
        worker.kill()
        worker.wait()
        assert gone(job, 10), "the job outlived its worker"
    finally:
        worker.kill()


@pytest.mark.slow
def test_a_job_stopped_before_it_could_save_is_run_again(tmp_path, monkeypatch):
    """The stop's SIGINT reaches a job still starting (Python's default handler: KeyboardInterrupt):
    the trial is interrupted, to run again (old code: 'exited with status 1', a failed trial that a
    rerun never ran, so the rerun's table lacked the method without a word)."""
    import sherl_pipe.compare.trial as trial

    (tmp_path / "job.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(trial, "StopFlag", lambda name: (lambda: True))
    monkeypatch.setattr(trial, "job_command", lambda spec: [sys.executable, str(tmp_path / "job.py")])
    out = trial.run_compare_trial({"number": 3, "threads": 1, "stop": "s",
                                   "pipeline": {"train": {"run_dir": str(tmp_path / "c" / "trials" / "0003"),
                                                          "method": "sherl"}}})
    assert out == {"number": 3, "state": "interrupted"}


@pytest.mark.slow
def test_a_jobs_own_process_group_keeps_a_terminals_ctrl_c_from_it(tmp_path):
    """The job runs in a session of its own: a Ctrl-C sent to the compare's process group reaches
    the worker, which passes the stop on, never the job directly."""
    worker = subprocess.Popen([sys.executable, "-c", _worker_script(tmp_path, FAKE_JOB)], start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
            assert time.time() < deadline and worker.poll() is None
            time.sleep(0.1)
        job = int((tmp_path / "pid").read_text())
        assert os.getpgid(job) != os.getpgid(worker.pid)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert gone(job, 10)


def gone(pid: int, timeout: float) -> bool:
    """Whether process PID has ended (or is a zombie) within TIMEOUT seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
