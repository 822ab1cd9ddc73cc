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
    # distributed adds its defaults to dask's config when first imported: import it before setting
    # any distributed.* key, or leaving the `set` below would drop those defaults with it.
    import dask
    import distributed  # noqa: F401

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if scheduler:
            with _remote(cfg, scheduler) as eng:
                yield eng
        else:
            with _local(cfg) as eng:
                yield eng


@contextlib.contextmanager
def _remote(cfg: SweepConfig, scheduler: str):
    from distributed import Client

    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise SherlError(f"--scheduler {scheduler}: cannot connect ({exc}); give a running dask scheduler's "
                         f"address, or leave it out for a local cluster") from None
    with client:
        workers = client.scheduler_info()["workers"]
        if not workers:
            raise SherlError(f"--scheduler {scheduler}: the cluster has no workers; start some")
        threads = cfg.threads or max(1, min(w.get("nthreads", 1) for w in workers.values()))
        yield Engine(client, len(workers), threads, f"the cluster at {scheduler} ({len(workers)} workers)")


@contextlib.contextmanager
def _local(cfg: SweepConfig):
    """Worker processes that run one trial at a time. Their environment is dask's default less
    MALLOC_TRIM_THRESHOLD_: setting it turns off glibc's adaptive mmap threshold, so every tensor
    of 128 KiB or more was mmapped and page-faulted afresh at each step (about 600 mmap/munmap
    pairs a second, a third of a worker's CPU time in the kernel, measured here on 2 cores). The
    statistical profiler, which samples the running trial's stack every 10 ms, is off too."""
    import dask
    from distributed import Client, LocalCluster

    cores = os.cpu_count() or 1
    n = cfg.workers or min(cfg.parallel or cores, cores)
    threads = cfg.threads or max(1, cores // n)
    environ = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": False}):
        # The scheduler serves HTTP even without a dashboard, on 8787 unless told otherwise; ":0"
        # takes a free port, so a second sweep (or another dask cluster) causes no port warning.
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            _pin(client, threads)
            yield Engine(client, n, threads, f"a local cluster of {n} worker processes")


def _pin(client, threads: int) -> None:
    """Each worker on cores of its own (when the machine has enough): a trial's threads neither
    migrate nor compete with another trial's. Measured on 2 cores: a trial next to another took
    14.0 s unpinned and about 12.6 s pinned, against 12.4 s alone."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    workers = sorted(client.scheduler_info()["workers"])
    if len(cores) < len(workers) * threads:
        return
    for i, address in enumerate(workers):
        mine = set(cores[i * threads:(i + 1) * threads])
        client.run(os.sched_setaffinity, 0, mine, workers=[address])
