"""The dask cluster a sweep runs its trials on: a LocalCluster of worker processes by default,
or an existing cluster by address (its workers must be able to read the cache path)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from sherl_pipe.errors import SherlError
from sherl_pipe.sweep.config import SweepConfig


@dataclass
class Engine:
    client: object
    workers: int
    threads: int  # torch threads per trial
    where: str


@contextlib.contextmanager
def engine(cfg: SweepConfig, scheduler: str | None):
    """A dask client. A task on a worker that dies is not retried (allowed-failures 0): the trial
    is recorded as failed; a LocalCluster's nanny starts a new worker in its place."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise SherlError(f"--scheduler {scheduler}: cannot connect ({exc}); give a running dask "
                                 f"scheduler's address, or leave it out for a local cluster") from None
            with client:
                yield _remote(client, cfg, scheduler)
            return
        cores = os.cpu_count() or 1
        n = cfg.workers or min(cfg.parallel or cores, cores)
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield Engine(client, n, cfg.threads or max(1, cores // n), f"a local cluster of {n} worker processes")


def _remote(client, cfg: SweepConfig, scheduler: str) -> Engine:
    workers = client.scheduler_info()["workers"]
    if not workers:
        raise SherlError(f"--scheduler {scheduler}: the cluster has no workers; start some")
    threads = cfg.threads or max(1, min(w.get("nthreads", 1) for w in workers.values()))
    return Engine(client, len(workers), threads, f"the cluster at {scheduler} ({len(workers)} workers)")
