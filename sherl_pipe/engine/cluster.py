"""The dask cluster trials run on (a sweep's, a comparison's): a LocalCluster of worker processes
by default, or an existing cluster by address (its workers must be able to read the cache path);
both made by sherl_pipe/dask_cluster.py, which extraction shares.

A trial runs alone in its worker process: torch's global RNG (which dropout inside transformers'
attention draws from, with no way to pass a generator) and its thread count are per process, so
two trials in one process would change each other's results. The coordinator therefore submits
each trial to a worker that runs no other trial, and worker.py holds a per-process lock as well
(a cluster whose workers have several threads still runs one trial per worker at a time).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass

from distributed import WorkerPlugin

from sherl_pipe.dask_cluster import connect, local_cluster, register_plugin
from sherl_pipe.interrupts import ignore_interrupts

PLUGIN = "sherl-pipe-sweep"  # the name its workers know it by since sweeps came first


class TrialWorker(WorkerPlugin):
    """A dask worker plugin, run in every worker when it starts (restarted ones included): imports
    what a trial needs once, before any trial starts (two trials importing transformers' lazy
    modules at once raised an ImportError), and, on a local cluster, ignores the terminal's Ctrl-C,
    which reaches every process of the foreground group: the coordinator stops its trials itself."""

    name = PLUGIN

    def __init__(self, model_type: str | None, shield: bool, modules: tuple[str, ...] = ()):
        self.model_type, self.shield, self.modules = model_type, shield, modules

    def setup(self, worker=None):
        if self.shield:
            ignore_interrupts()
        # warm-up: what a trial imports, loaded as the worker starts rather than in its first trial
        import sherl_pipe.engine.worker  # noqa: F401
        import sherl_pipe.training.run  # noqa: F401

        for name in self.modules:  # the caller's trial function's (sweep's, compare's)
            importlib.import_module(name)

        if self.model_type:
            import transformers
            from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

            getattr(transformers, MODEL_MAPPING_NAMES.get(self.model_type, "AutoModel"), None)

    def teardown(self, worker=None):
        return None


@dataclass
class Cluster:
    client: object
    workers: int
    threads: int  # torch threads per trial
    where: str

    def free_workers(self, busy: set[str]) -> list[str]:
        """The addresses of workers running none of the trials (asked anew each time: a
        worker that died was replaced by one at another address)."""
        return sorted(set(self.client.scheduler_info(n_workers=-1)["workers"]) - busy)


@contextlib.contextmanager
def start_cluster(scheduler: str | None, model_type: str | None = None, workers: int = 0, threads: int = 0,
                  parallel: int = 0, warm: tuple[str, ...] = ()):
    """A Cluster: the one at SCHEDULER, or a local one of WORKERS processes (0: one per core, at most
    PARALLEL when that is set); THREADS torch threads per trial (0: cores / workers). A task on a
    worker that dies is not retried (allowed-failures 0): the coordinator records the trial as lost
    and runs it again; a LocalCluster's nanny starts a new worker. MODEL_TYPE: the backbone whose
    modules each worker imports as it starts; WARM: the modules of the caller's trial function."""
    # distributed adds its defaults to dask's config when first imported: import it before setting
    # any distributed.* key, or leaving the `set` below would drop those defaults with it.
    import dask
    import distributed  # noqa: F401

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if scheduler:
            with _remote(scheduler, threads) as eng:
                register_plugin(eng.client, TrialWorker(model_type, shield=False, modules=warm), PLUGIN)
                yield eng
        else:
            with _local(workers, threads, parallel) as eng:
                register_plugin(eng.client, TrialWorker(model_type, shield=True, modules=warm), PLUGIN)
                yield eng


@contextlib.contextmanager
def _remote(scheduler: str, threads: int):
    with connect(scheduler) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        threads = threads or max(1, min(w.get("nthreads", 1) for w in workers.values()))
        yield Cluster(client, len(workers), threads, f"the cluster at {scheduler} ({len(workers)} workers)")


@contextlib.contextmanager
def _local(workers: int, threads: int, parallel: int):
    """Worker processes that run one trial at a time (dask_cluster.local_cluster)."""
    cores = os.cpu_count() or 1
    n = workers or min(parallel or cores, cores)
    threads = threads or max(1, cores // n)
    with local_cluster(n, threads) as client:
        yield Cluster(client, n, threads, f"a local cluster of {n} worker processes")
