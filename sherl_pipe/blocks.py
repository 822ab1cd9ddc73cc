"""One extraction block: the early layers' tiers of its samples, its side arrays, then written and
marked done. The in-process extraction and a dask worker run the same code on the same inputs (the
coordinator's tokens in storage order), so a cache written by N workers holds the bytes of a
single-process one, and a block that dask runs twice writes the same bytes twice.

A worker keeps what it needs across blocks in its process: the backbone (checked once against the
manifest's module hashes, so a worker whose folder holds other weights refuses to write) and the
cache's block writer (the store opened once).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sherl_pipe.backbone import Backbone
from sherl_pipe.cache.codec import whole_time_chunks
from sherl_pipe.cache.lease import Lease
from sherl_pipe.cache.location import Location
from sherl_pipe.cache.writer import BlockWriter
from sherl_pipe.devices import pick_device
from sherl_pipe.encode import Tokenized, forward_block, pad_batch
from sherl_pipe.errors import SherlError


@dataclass(frozen=True)
class BlockJob:
    """What every block of one extraction shares; small, so it travels with each task."""

    location: Location  # with its storage options: handed over in memory, never written
    backbone: str  # the backbone folder or embedded: name, as the workers reach it
    attn_implementation: str
    device: str  # backbone.device (auto is resolved where the block runs)
    tiers: tuple[int, ...]
    batch_size: int
    dtype: str
    time_chunk: int
    hashes: dict  # the manifest's per-module hashes
    cache_name: str  # for messages
    run_id: str = ""  # one extraction run: a worker that outlives it (a cluster elsewhere) reopens the cache
    precision: str = "fp32"  # extract.precision: the early layers' autocast
    data: Location | None = None  # where the cache's arrays are (store.data_location); None: at `location`
    generation: int | None = None  # the coordinator's lease generation (object stores), checked per block


@dataclass
class BlockTask:
    """One block's samples in storage order: tokens and side arrays, and the split's time axis."""

    split: str
    block: int
    time_len: int
    ids: list
    types: list | None
    lengths: np.ndarray
    labels: np.ndarray
    row_ids: np.ndarray

    @property
    def samples(self) -> int:
        return len(self.lengths)


def make_task(plan, split: str, block: int, chunk_size: int) -> BlockTask:
    """Block BLOCK of a split, from the coordinator's plan (extraction.Plan)."""
    data, tok = plan.dataset.splits[split], plan.tokenized[split]
    idx = np.arange(block * chunk_size, min((block + 1) * chunk_size, len(data)))
    return BlockTask(split, block, tok.max_len, [tok.ids[i] for i in idx],
                     None if tok.types is None else [tok.types[i] for i in idx],
                     tok.lengths[idx], data.labels[idx], data.row_ids[idx])


def compute_block(backbone, job: BlockJob, task: BlockTask, device) -> dict[str, np.ndarray]:
    """The block's arrays: tiers from the model (positions up to its longest sample, in whole
    time chunks), input_ids (and token types), lengths, labels, row ids."""
    tok = Tokenized(task.ids, task.types, task.lengths)
    idx = np.arange(task.samples)
    width = whole_time_chunks(int(task.lengths.max()), job.time_chunk, task.time_len)
    pad_id = backbone.tokenizer.pad_token_id or 0
    arrays = forward_block(backbone, tok, idx, list(job.tiers), width, job.batch_size, job.dtype, device,
                           f"cache {job.cache_name}, split '{task.split}', block {task.block}", job.precision)
    arrays["input_ids"] = pad_batch(task.ids, pad_id, width, np.int32)
    if task.types is not None:
        arrays["token_type_ids"] = pad_batch(task.types, 0, width, np.int8)
    arrays["lengths"] = task.lengths
    arrays["labels"] = task.labels
    arrays["row_ids"] = task.row_ids
    return arrays


# ---------------------------------------------------------------------------------------------
# On a worker: the backbone and the writer, once per process

_HELD: dict = {}
_HELD_LOCK = threading.Lock()


def loaded_backbone(source: str, attn_implementation: str, device_name: str):
    """(backbone, device, module hashes) of SOURCE, loaded once per process (a worker's plugin
    loads it as the worker starts, before its first block)."""
    key = ("backbone", source, attn_implementation, device_name)
    with _HELD_LOCK:
        if key not in _HELD:
            _forget("backbone")
            device = pick_device(device_name)
            backbone = Backbone(source, attn_implementation, device)
            _HELD[key] = (backbone, device, backbone.module_hashes())
        return _HELD[key]


def worker_backbone(job: BlockJob):
    """The backbone, refused if its modules are not the manifest's. One loaded earlier whose
    modules differ is loaded once more first: a long-lived worker sees a folder whose weights changed."""
    backbone, device, hashes = loaded_backbone(job.backbone, job.attn_implementation, job.device)
    if _differ(job.hashes, hashes):
        with _HELD_LOCK:
            _forget("backbone")
        backbone, device, hashes = loaded_backbone(job.backbone, job.attn_implementation, job.device)
    differ = _differ(job.hashes, hashes)
    if differ:
        raise SherlError(f"backbone {job.backbone} on worker {socket.gethostname()}: its modules "
                         f"{', '.join(differ[:4])} differ from the cache's manifest; every worker must "
                         f"reach the same backbone at the same path")
    return backbone, device


def _differ(expected: dict, hashes: dict) -> list[str]:
    return sorted(k for k, v in expected.items() if hashes.get(k) != v)


def worker_writer(job: BlockJob):
    """The cache's block writer, opened once per extraction run (an --overwrite may have made its
    arrays anew since the last run this worker served)."""
    key = ("writer", job.location.url, job.run_id)
    with _HELD_LOCK:
        if key not in _HELD:
            _forget("writer")
            _HELD[key] = BlockWriter(job.data or job.location, fence=lambda: check_generation(job))
        return _HELD[key]


def check_generation(job: BlockJob) -> None:
    """Before a worker writes a block: the extraction that sent it still holds the cache's lease
    (a worker of a coordinator that was paused past its lease, or lost it, writes nothing more)."""
    if job.generation is None:
        return
    newest = max(Lease(job.location).generations(), default=0)
    if newest != job.generation:
        raise SherlError(f"cache {job.cache_name}: the extraction that sent this block lost the cache's lease "
                         f"(generation {job.generation}; the cache is now at {newest}); the block is not written")


def _forget(kind: str) -> None:
    """Drop what an earlier extraction left in this process (one backbone, one writer at a time)."""
    for key in [k for k in _HELD if k[0] == kind]:
        del _HELD[key]


def run_block(job: BlockJob, task: BlockTask) -> dict:
    """What a dask worker runs for one block: forward, encode, write, mark done; returns counts."""
    backbone, device = worker_backbone(job)
    with torch.inference_mode():
        arrays = compute_block(backbone, job, task, device)
    worker_writer(job).write_block(task.split, task.block, arrays)
    return {"split": task.split, "block": task.block, "samples": task.samples,
            "tokens": int(task.lengths.sum())}
