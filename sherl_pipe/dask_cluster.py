"""The dask clusters sherl-pipe runs work on (sweep trials, extraction blocks): a LocalCluster of
worker processes started here, or an existing cluster by its scheduler's address.

Shared by the trial engine (engine/cluster.py) and distributed extraction (distributed_extract.py);
Ctrl-C around them is interrupts.py's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from sherl_pipe.errors import SherlError
from sherl_pipe.interrupts import shielded


def connect(scheduler: str, option: str = "--scheduler"):
    """A client of an existing cluster, with at least one worker."""
    from distributed import Client

    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise SherlError(f"{option} {scheduler}: cannot connect ({exc}); give a running dask scheduler's "
                         f"address, or leave it out for a local cluster") from None
    if not client.scheduler_info()["workers"]:
        client.close()
        raise SherlError(f"{option} {scheduler}: the cluster has no workers; start some")
    return client


FORKSERVER = "forkserver"
PLUGIN_TRIES = 5  # a worker that dies while the plugin is registered closes its stream: try again


def register_plugin(client, plugin, name: str) -> None:
    """Register a worker plugin (the scheduler keeps it for every worker that joins later). A
    worker killed as it joins makes the call fail with distributed's CommClosedError ("Stream is
    closed", an OSError with no file), which ended a whole extraction although a dead worker should
    cost only its blocks in flight: the call is repeated (registering again under the same name
    replaces the plugin) while the cluster replaces the worker."""
    from distributed.comm.core import CommClosedError

    for attempt in range(PLUGIN_TRIES):
        try:
            client.register_plugin(plugin, name=name)
            return
        except CommClosedError as exc:  # not any OSError: a plugin's own setup error keeps its traceback
            if attempt == PLUGIN_TRIES - 1:
                raise SherlError(f"the cluster's workers kept dying while they started (their plugin could not be "
                                 f"registered: {exc}); check the workers' memory and logs, then rerun the "
                                 f"command") from None
            time.sleep(1.0)


def thread_environ(threads: int) -> dict[str, str]:
    """The thread-count variables a worker process starts with."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@contextlib.contextmanager
def local_cluster(n: int, threads: int, method: str = "spawn"):
    """A client of a new LocalCluster of N single-threaded worker processes, each with THREADS
    torch/BLAS threads, pinned to cores of their own when the machine has enough. METHOD: how the
    worker processes start, spawned (dask's default) or forked from the fork server (start_forkserver).

    Their environment is dask's default less MALLOC_TRIM_THRESHOLD_: setting it turns off glibc's
    adaptive mmap threshold, so every tensor of 128 KiB or more was mmapped and page-faulted afresh
    at each step (about 600 mmap/munmap pairs a second, a third of a worker's CPU time in the
    kernel, measured here on 2 cores). The statistical profiler, which samples the running task's
    stack every 10 ms, is off too."""
    import dask
    from distributed import Client, LocalCluster

    settings = {"distributed.nanny.pre-spawn-environ": thread_environ(threads),
                "distributed.worker.profile.enabled": False, "distributed.worker.multiprocessing-method": method}
    with dask.config.set(settings):
        # The scheduler serves HTTP even without a dashboard, on 8787 unless told otherwise; ":0"
        # takes a free port, so a second cluster causes no port warning. Logs below CRITICAL stay
        # quiet: a task's error reaches the caller, which reports it in one line.
        with shielded():
            try:
                cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=logging.CRITICAL)
            except RuntimeError as exc:  # dask's "Nanny failed to start."; the workers' own tracebacks are above it
                raise SherlError(f"the local cluster's worker processes failed to start ({exc}); a script that "
                                 f"starts local workers must do so under `if __name__ == \"__main__\":` (each "
                                 f"worker starts by importing the script), or set workers = 1") from None
        with cluster, Client(cluster) as client:
            pin(client, threads)
            yield client


def start_forkserver(preload: tuple[str, ...], environ: dict[str, str]) -> str:
    """Start, once per process, the fork server that local_cluster(method=FORKSERVER) forks its
    workers from, with the modules PRELOAD imported in it: each worker then starts with them
    imported instead of importing them itself (torch and transformers: about 2 s per worker here,
    every worker at once competing with the coordinator for the cores). The server runs no torch
    work, so its children may use any number of threads (a child forked from a process whose
    OpenMP pool has run hangs in its first parallel region: measured here).

    Call it from the main thread: the server starts with Ctrl-C ignored and every process it forks
    inherits that, whichever thread later asks for a worker. ENVIRON: the thread variables the
    server, and so every worker, starts with (the nanny's pre-spawn environment reaches only
    processes spawned from this one). The server keeps the environment of its start: workers that
    need this process's environment of later (other thread counts, credentials set since) are
    given it by their plugin (distributed_extract.ExtractWorker). A server already running is
    reused as it is; stop_forkserver ends it (the extraction does, as it ends). Returns the start method for local_cluster: FORKSERVER, or "spawn" where
    the platform has no fork server (Windows)."""
    import multiprocessing

    import dask
    from distributed.utils import get_mp_context

    if FORKSERVER not in multiprocessing.get_all_start_methods():
        return "spawn"
    import multiprocessing.forkserver
    with dask.config.set({"distributed.worker.multiprocessing-method": FORKSERVER}):
        context = get_mp_context()  # on first use dask sets its own preload list: ours replaces it
    context.set_forkserver_preload(["distributed", *preload])
    saved = {name: os.environ.get(name) for name in environ}
    try:
        os.environ.update(environ)
        with shielded():
            multiprocessing.forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return FORKSERVER


def stop_forkserver() -> None:
    """End the fork server start_forkserver started, if one runs (the next start makes a new one).
    multiprocessing has no public call for it; its own tests use this one."""
    import multiprocessing.forkserver

    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is not None and hasattr(server, "_stop"):
        server._stop()


def pin(client, threads: int) -> None:
    """Each worker on cores of its own (when the machine has enough): a task's threads neither
    migrate nor compete with another worker's. Measured on 2 cores: a trial next to another took
    14.0 s unpinned and about 12.6 s pinned, against 12.4 s alone."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if len(cores) < len(workers) * threads:
        return
    for i, address in enumerate(workers):
        mine = set(cores[i * threads:(i + 1) * threads])
        client.run(os.sched_setaffinity, 0, mine, workers=[address])
