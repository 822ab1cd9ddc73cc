"""The dask cluster a sweep runs its trials on: a LocalCluster of worker processes by default,
or an existing cluster by address (its workers must be able to read the cache path).

A trial runs alone in its worker process: torch's global RNG (which dropout inside transformers'
attention draws from, with no way to pass a generator) and its thread count are per process, so
two trials in one process would change each other's results. The sweep therefore submits each
trial to a worker that runs no other trial of the sweep, and trial.py holds a per-process lock as
well (a cluster whose workers have several threads still runs one trial per worker at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass

from distributed import WorkerPlugin

from sherl_pipe.errors import SherlError
from sherl_pipe.sweep.config import SweepConfig

PLUGIN = "sherl-pipe-sweep"


class TrialWorker(WorkerPlugin):
    """A dask worker plugin, run in every worker when it starts (restarted ones included): imports
    what a trial needs once, before any trial starts (two trials importing transformers' lazy
    modules at once raised an ImportError), and, on a local cluster, ignores the terminal's Ctrl-C,
    which reaches every process of the foreground group: the sweep stops its trials itself."""

    name = PLUGIN

    def __init__(self, model_type: str | None, shield: bool):
        self.model_type, self.shield = model_type, shield

    def setup(self, worker=None):
        if self.shield and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        import sherl_pipe.sweep.trial  # noqa: F401
        import sherl_pipe.training.run  # noqa: F401

        if self.model_type:
            import transformers
            from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

            getattr(transformers, MODEL_MAPPING_NAMES.get(self.model_type, "AutoModel"), None)

    def teardown(self, worker=None):
        return None


@dataclass
class Engine:
    client: object
    workers: int
    threads: int  # torch threads per trial
    where: str

    def free_workers(self, busy: set[str]) -> list[str]:
        """The addresses of workers running none of the sweep's trials (asked anew each time: a
        worker that died was replaced by one at another address)."""
        return sorted(set(self.client.scheduler_info(n_workers=-1)["workers"]) - busy)


@contextlib.contextmanager
def engine(cfg: SweepConfig, scheduler: str | None, model_type: str | None = None):
    """A dask client. A task on a worker that dies is not retried (allowed-failures 0): the sweep
    records the trial as lost and runs it again; a LocalCluster's nanny starts a new worker."""
    # distributed adds its defaults to dask's config when first imported: import it before setting
    # any distributed.* key, or leaving the `set` below would drop those defaults with it.
    import dask
    import distributed  # noqa: F401

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if scheduler:
            with _remote(cfg, scheduler) as eng:
                eng.client.register_plugin(TrialWorker(model_type, shield=False), name=PLUGIN)
                yield eng
        else:
            with _local(cfg) as eng:
                eng.client.register_plugin(TrialWorker(model_type, shield=True), name=PLUGIN)
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
        # Logs below CRITICAL stay quiet: a trial's error (dask's "Compute Failed" with its
        # traceback) is in its error.txt and one line of the sweep's; a dead worker is reported too.
        with _shielded():
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.CRITICAL)
        with cluster, Client(cluster) as client:
            _pin(client, threads)
            yield Engine(client, n, threads, f"a local cluster of {n} worker processes")


@contextlib.contextmanager
def _shielded():
    """Ctrl-C ignored while the first workers start: an ignored signal stays ignored across fork
    and exec (and Python keeps it so), so the terminal's Ctrl-C, sent to the whole foreground
    process group, never reaches them; workers started later ignore it from TrialWorker.setup on.
    (Blocking the signal instead does not reach them: dask spawns from threads that exist already.)
    A Ctrl-C in those few seconds is lost; the next one stops the sweep."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
