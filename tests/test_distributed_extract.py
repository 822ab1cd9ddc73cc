"""The coordinator of an extraction on a dask cluster (distributed_extract.py), with stand-in
blocks on an in-process cluster."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

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

    import sherl_pipe.blocks
    from sherl_pipe.distributed_extract import run_blocks

    monkeypatch.setattr(sherl_pipe.blocks, "run_block", fake_block)
    FINISHED.clear()
    RUNNING.clear()
    tasks = [SimpleNamespace(split="train", block=b) for b in range(2)]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(SherlError, match="block 0"):
            run_blocks(client, SimpleNamespace(run_id="t1"), iter(tasks), lambda counts: None)
        assert FINISHED == [1]  # block 1 had ended when the coordinator gave up
