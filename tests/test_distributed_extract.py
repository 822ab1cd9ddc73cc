"""The coordinator of an extraction on a dask cluster (distributed_extract.py), with stand-in
blocks on an in-process cluster."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from sherl_pipe.errors import SherlError

FINISHED: list[int] = []
RUNNING = threading.Event()


def fake_block(job, task):
    """Block 0 fails once block 1 runs; block 1 takes a while, then records that it ended."""
    if task.block == 0:
        assert RUNNING.wait(30)
        raise SherlError("block 0: a bad chunk")
    RUNNING.set()
    time.sleep(0.8)
    FINISHED.append(task.block)
    return {"split": task.split, "samples": 1, "tokens": 1}


def test_a_failed_extraction_waits_for_its_running_blocks_before_it_lets_go(monkeypatch):
    """Cancelling a future does not stop its running task: on a cluster that outlives the
    coordinator (--scheduler) a block went on after the coordinator raised and released the cache's
    lock, and could mark itself done in a cache that a new extraction had cleared meanwhile (old
    code: run_blocks raised while block 1 still ran)."""
    from distributed import Client, LocalCluster

    import sherl_pipe.distributed_extract as distributed
    from sherl_pipe.distributed_extract import run_blocks

    monkeypatch.setattr(distributed, "run_block", fake_block)
    FINISHED.clear()
    RUNNING.clear()
    tasks = [SimpleNamespace(split="train", block=b) for b in range(2)]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(SherlError, match="block 0"):
            run_blocks(client, SimpleNamespace(run_id="t1"), iter(tasks), lambda counts: None)
        assert FINISHED == [1]  # block 1 had ended when the coordinator gave up


def _holds_backbone() -> bool:
    from sherl_pipe.blocks import _HELD

    return any(key[0] == "backbone" for key in _HELD)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_a_local_cluster_starts_while_the_coordinator_prepares(tmp_path, bert_dir, labeled_csv, monkeypatch, threads):
    """extract.workers = 2: the cluster is started before the data is read, and its workers hold
    the backbone before the first block (old code: the cluster started after the data was read,
    tokenized and hashed, and each worker loaded the backbone in its first block); the blocks go out
    longest first (old code: in storage order, short to long, the longest last); a rerun on the
    finished cache starts no cluster; the arrays equal a single process's."""
    import conftest
    import sherl_pipe.distributed_extract as distributed
    import sherl_pipe.extraction as extraction
    from sherl_pipe.cache import Cache
    from sherl_pipe.config import load_pipeline

    order, warm, sizes = [], [], []
    real_start, real_prepare, real_run = distributed.ClusterStart.__init__, extraction.prepare, distributed.run_blocks

    def start(self, *args, **kwargs):
        order.append("cluster")
        real_start(self, *args, **kwargs)

    def prepare(*args, **kwargs):
        order.append("prepare")
        return real_prepare(*args, **kwargs)

    def run_blocks(client, job, tasks, on_done, check_lock=lambda: None):
        warm.extend(client.run(_holds_backbone).values())
        tasks = list(tasks)
        sizes.extend(t.samples * int(t.lengths.max()) for t in tasks)
        return real_run(client, job, iter(tasks), on_done, check_lock)

    monkeypatch.setattr(distributed.ClusterStart, "__init__", start)
    monkeypatch.setattr(extraction, "prepare", prepare)
    monkeypatch.setattr(distributed, "run_blocks", run_blocks)
    one = conftest.write_pipeline(tmp_path / "one.toml", bert_dir, labeled_csv, tmp_path / "one")
    two = conftest.write_pipeline(tmp_path / "two.toml", bert_dir, labeled_csv, tmp_path / "two", "workers = 2")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the one-process cache at 1 and at 2 threads; each worker has 1
    try:
        extraction.extract(load_pipeline(str(one)), log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    order.clear()
    said = []
    extraction.extract(load_pipeline(str(two)), log=said.append)
    assert order == ["cluster", "prepare"], order
    assert warm == [True, True]
    assert len(sizes) > 2 and sizes == sorted(sizes, reverse=True), sizes
    assert any("local cluster of 2 worker processes" in m for m in said), said
    conftest.assert_same_arrays(Cache(tmp_path / "one"), Cache(tmp_path / "two"))  # within one fp16 step
    order.clear()
    summary = extraction.extract(load_pipeline(str(two)), log=lambda m: None)
    assert summary.already_complete and order == ["prepare"]


@pytest.mark.slow
def test_bad_data_with_workers_stops_the_cluster_started_for_it(tmp_path, bert_dir, labeled_csv):
    """The cluster starts before the data is read; data refused then leaves no cluster running."""
    import conftest
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    p = conftest.write_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "c", "workers = 2")
    with pytest.raises(SherlError, match="no_such_column"):
        extract(load_pipeline(str(p), ["data.text_column=no_such_column"]), log=lambda m: None)
    assert not [t for t in threading.enumerate() if t.name == "sherl-pipe cluster"]
    assert not (tmp_path / "c" / "manifest.json").exists()


def _setting(name: str):
    import os

    return os.environ.get(name)  # read in the worker (os.environ.get itself would travel as a copy of ours)


@pytest.mark.slow
def test_local_workers_get_the_environment_of_now_not_the_fork_servers(monkeypatch):
    """The fork server keeps the environment it started with; a worker gets the coordinator's as
    it is when its cluster starts (S3 credentials set after an earlier extraction in the same
    process: without this, the workers lacked them)."""
    from sherl_pipe.distributed_extract import ClusterStart

    ClusterStart(1).close()  # a fork server running, as after an earlier extraction
    monkeypatch.setenv("SHERL_PIPE_TEST_SETTING", "set since")
    started = ClusterStart(1)
    try:
        client, _ = started.get()
        assert list(client.run(_setting, "SHERL_PIPE_TEST_SETTING").values()) == ["set since"]
    finally:
        started.close()


@pytest.mark.slow
def test_a_script_without_a_main_guard_is_told_what_to_add(tmp_path, bert_dir, labeled_csv):
    """Local workers start by importing the calling script: one that calls extract at import time
    made them fail, and ended on dask's 'Nanny failed to start.' under 170 lines of tracebacks."""
    import subprocess
    import sys

    import conftest

    p = conftest.write_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "c", "workers = 2")
    script = tmp_path / "no_guard.py"
    script.write_text(f"from sherl_pipe.config import load_pipeline\nfrom sherl_pipe.extraction import extract\n"
                      f"extract(load_pipeline({str(p)!r}))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert 'under `if __name__ == "__main__":`' in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


@pytest.mark.slow
def test_the_fork_server_ends_with_the_extraction(tmp_path, bert_dir, labeled_csv):
    """Old code: the fork server the workers came from (torch and transformers imported: about
    400 MiB) lived until the calling process ended. A second extraction starts a new one."""
    import multiprocessing.forkserver

    import psutil

    from conftest import write_pipeline
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    def servers() -> list:
        return [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]

    for name in ("a", "b"):
        p = write_pipeline(tmp_path / f"{name}.toml", bert_dir, labeled_csv, tmp_path / name, "workers = 2")
        extract(load_pipeline(str(p)), log=lambda m: None)
        assert multiprocessing.forkserver._forkserver._forkserver_pid is None
        assert servers() == []


def test_a_worker_dying_as_the_plugin_is_registered_does_not_end_the_extraction(monkeypatch):
    """Old code: a local worker killed as it joined ended the whole extraction with 'error: a file:
    in <TCP (closed) ConnectionPool.register_worker_plugin ...>: Stream is closed'. The registration
    is tried again; only a cluster whose workers keep dying is an error, in one line."""
    from distributed.comm.core import CommClosedError

    import sherl_pipe.dask_cluster as cluster
    from sherl_pipe.errors import SherlError, os_error_message

    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    calls = []

    class Client:
        def __init__(self, failures):
            self.failures = failures

        def register_plugin(self, plugin, name):
            calls.append(name)
            if len(calls) <= self.failures:
                raise CommClosedError("in <TCP (closed) ConnectionPool.register_worker_plugin>: Stream is closed")

    cluster.register_plugin(Client(2), object(), "p")
    assert calls == ["p", "p", "p"]
    calls.clear()
    with pytest.raises(SherlError, match="workers kept dying while they started"):
        cluster.register_plugin(Client(99), object(), "p")
    assert os_error_message(CommClosedError("Stream is closed")).startswith("CommClosedError: ")
