"""Extraction on dask.distributed: blocks as tasks on a local cluster (`extract.workers = N`) or an
existing one (`extract --scheduler ADDRESS`), whose workers must reach the cache location and the
backbone at the paths the coordinator gives (made absolute first).

The coordinator (extraction.extract) has read and tokenized the data, written the manifest and
created the arrays, and holds the cache's lock; here it hands out the blocks not yet done, at most
IN_FLIGHT_PER_WORKER per worker at a time (each carries its own samples' tokens), releases each
finished future, and counts what came back. A task runs tokens -> forward -> encode -> write ->
done on its worker (blocks.run_block). A worker that dies loses only its blocks in flight: dask
runs them again elsewhere (a block written twice leaves the same bytes). A coordinator whose
extraction fails or is interrupted cancels the blocks in flight and waits for those already
running to end before it releases the cache's lock. A coordinator that is killed leaves the
blocks done so far; rerunning the command redoes only the others.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid

import torch
from distributed import WorkerPlugin

from sherl_pipe.blocks import loaded_backbone, run_block
from sherl_pipe.cache import set_codec_threads
from sherl_pipe.dask_cluster import (connect, local_cluster, register_plugin, start_forkserver, stop_forkserver,
                                     thread_environ)
from sherl_pipe.interrupts import ignore_interrupts
from sherl_pipe.errors import SherlError

PLUGIN = "sherl-pipe-extract"
IN_FLIGHT_PER_WORKER = 2  # one running, one waiting: a worker never idles between blocks
STRAGGLER_SECONDS = 300.0  # a failed extraction waits this long at most for its running blocks to end


# What a worker forked from the fork server has imported already (dask_cluster.start_forkserver):
# transformers.modeling_utils is the bulk of a model class's import (1.5 of 2 s for BERT here).
PRELOAD = ("torch", "transformers.modeling_utils", "sherl_pipe.backbone", "sherl_pipe.blocks")


class ExtractWorker(WorkerPlugin):
    """Run in every worker as it starts (restarted ones too): torch's and the codec's threads, the
    imports a block needs, and on a local cluster the terminal's Ctrl-C ignored, ENVIRON (the
    coordinator's environment: a worker forked from the fork server has the server's, which may be
    older, without credentials set since) and, given WARM (backbone source, attention
    implementation, device), the backbone loaded before any block asks for it."""

    name = PLUGIN

    def __init__(self, threads: int, shield: bool, warm: tuple[str, str, str] | None = None,
                 environ: dict[str, str] | None = None):
        self.threads, self.shield, self.warm, self.environ = threads, shield, warm, environ or {}

    def setup(self, worker=None):
        os.environ.update(self.environ)
        if self.shield:
            ignore_interrupts()
        torch.set_num_threads(self.threads)
        set_codec_threads(1)
        if self.warm:
            try:
                loaded_backbone(*self.warm)
            except Exception:  # noqa: BLE001 - only a head start: the first block loads it again and says why it failed
                pass


class ClusterStart:
    """A local cluster of WORKERS processes for the blocks, started in a background thread as the
    extraction begins, so its workers start, import and load the backbone (WARM) while the
    coordinator reads, tokenizes and hashes, instead of after. The fork server the workers come
    from is started first, here in the calling (main) thread: the workers ignore the terminal's
    Ctrl-C, as spawned ones did. `get()` waits for the cluster: (client, description); `close()`
    stops it, in the thread that started it (a dask client is left where it was entered)."""

    def __init__(self, workers: int, warm: tuple[str, str, str] | None = None):
        self.workers, self.per = workers, max(1, (os.cpu_count() or 1) // workers)
        self.method = start_forkserver(PRELOAD, thread_environ(self.per))
        self._plugin = ExtractWorker(self.per, shield=True, warm=warm,
                                     environ={**os.environ, **thread_environ(self.per)})
        self._ready, self._stop = threading.Event(), threading.Event()
        self._got, self._error = None, None
        self._thread = threading.Thread(target=self._serve, name="sherl-pipe cluster", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            with local_cluster(self.workers, self.per, self.method) as client:
                register_plugin(client, self._plugin, PLUGIN)
                self._got = (client, f"a local cluster of {self.workers} worker processes "
                                     f"({self.per} torch thread(s) each)")
                self._ready.set()
                self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asks for the cluster
            self._error = exc
        finally:
            self._ready.set()

    def get(self):
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._got

    def close(self) -> None:
        """Stop the cluster and wait until it has, then the fork server it was forked from (it held
        torch and transformers, about 400 MiB, until the calling process ended; a later extraction
        starts a new one). Safe to call again."""
        self._stop.set()
        self._thread.join()
        if self.method == "forkserver":
            stop_forkserver()


@contextlib.contextmanager
def extraction_cluster(workers: int, scheduler: str | None, threads: int, started: ClusterStart | None = None):
    """(client, description): an existing cluster at SCHEDULER, or a local cluster of WORKERS
    processes with cores / WORKERS torch threads each (THREADS: a remote worker's): STARTED, or
    one started now. A local cluster is stopped as the blocks end."""
    if scheduler:
        with connect(scheduler) as client:
            register_plugin(client, ExtractWorker(threads, shield=False), PLUGIN)
            n = len(client.scheduler_info(n_workers=-1)["workers"])
            yield client, f"the cluster at {scheduler} ({n} workers)"
        return
    started = started or ClusterStart(workers)
    try:
        yield started.get()
    finally:
        started.close()


def run_blocks(client, job, tasks, on_done, check_lock=lambda: None) -> None:
    """Run every task of TASKS (an iterator of BlockTask) on the cluster, a bounded number at a
    time; ON_DONE(counts) as each finishes. A task's error (a SherlError on its worker) is raised
    here once the tasks in flight are cancelled."""
    from distributed import as_completed

    workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    tasks = iter(tasks)
    running = as_completed()
    run_id = job.run_id or uuid.uuid4().hex[:8]

    def submit_next() -> None:
        task = next(tasks, None)
        if task is not None:
            key = f"sherl-extract-{run_id}-{task.split}-{task.block}"
            running.add(client.submit(run_block, job, task, key=key, pure=False))

    for _ in range(IN_FLIGHT_PER_WORKER * workers):
        submit_next()
    try:
        for future in running:
            counts = _result(future)
            future.release()
            on_done(counts)
            check_lock()
            submit_next()
    except BaseException:
        for future in list(running.futures):
            future.cancel()
        wait_for_stragglers(client, f"sherl-extract-{run_id}-")
        raise


def _ours_running(prefix: str, dask_worker=None) -> list[str]:
    """The tasks of this extraction (keys starting PREFIX) still running on DASK_WORKER: a
    cancelled task keeps running its thread to the end, and stays in the worker's state till then."""
    return [str(ts.key) for ts in list(dask_worker.state.tasks.values())
            if str(ts.key).startswith(prefix) and ts.state in ("executing", "long-running", "cancelled", "resumed")]


def wait_for_stragglers(client, prefix: str, timeout: float = STRAGGLER_SECONDS) -> None:
    """Until no block of this extraction runs on any worker (at most TIMEOUT): cancelling a
    future does not stop a running task, and one that went on after the coordinator gave up and
    released the cache's lock could mark its block done in a cache that another extraction, with
    other settings, has cleared and begun to write since (on --scheduler's cluster, which
    outlives the coordinator). Best effort: a cluster that cannot answer runs nothing of ours."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            left = client.run(_ours_running, prefix)
        except Exception:  # noqa: BLE001 (the cluster is gone, or going: its workers write nothing more)
            return
        if not any(left.values()):
            return
        time.sleep(0.1)


def _result(future):
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker as exc:
        raise SherlError(f"extraction: the workers running one block kept dying ({exc}); check the workers' "
                         f"memory and logs, then rerun the command: finished blocks are kept") from None
