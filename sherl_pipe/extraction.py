"""Stage one: run the frozen early layers once over every split and cache the tiers.

Each split is stored sorted by length, so every block of `chunk_size` samples (exactly one Zarr
chunk along samples) holds samples of similar length: its forward batches are trimmed to their
longest member, and only the time chunks up to the block's longest sample are filled, compressed
and written. With extract.workers = 1 (the default) the blocks run in this process: while block
b+1 runs through the model, a writer thread compresses and writes block b (blosc and zstd release
the GIL), then sets its `done` flag. With more workers, or --scheduler, they run as tasks on a dask
cluster (distributed_extract.py); either way a block is blocks.compute_block on the same inputs,
so the cache holds the same bytes. The cache may be a local folder or an object-store URL
(cache/location.py).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from sherl_pipe.backbone import Backbone, tokenizer_identity
from sherl_pipe.blocks import BlockJob, compute_block, make_task
from sherl_pipe.cache import Cache, CacheWriter, make_compressors, set_codec_threads
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.cache.manifest import CUT_FIELDS, build_manifest
from sherl_pipe.cache.store import is_sherl_cache
from sherl_pipe.cache.writer import check_target
from sherl_pipe.config import Pipeline, absolute_paths
from sherl_pipe.devices import check_extract_precision, pick_device
from sherl_pipe.encode import reorder, storage_order, tokenize
from sherl_pipe.errors import CacheMismatch, SherlError
from sherl_pipe.methods.spec import make_spec
from sherl_pipe.request import check_phase_splits, check_splits, read_request
from sherl_pipe.formats import stored_dtype, stored_width


def resolve_tiers(requested: tuple[int, ...], cut: int) -> list[int]:
    bad = [t for t in requested if not 0 <= t <= cut]
    if bad:
        raise SherlError(f"extract.tiers: tier {bad[0]} is outside h[0..{cut}] (cut c = L - late_layers = {cut})")
    return sorted(set(requested) | {cut}) if requested else list(range(cut + 1))


@dataclass
class SplitSummary:
    samples: int = 0
    blocks_written: int = 0
    blocks_total: int = 0
    blocks_repaired: int = 0


@dataclass
class ExtractSummary:
    cache: str
    resumed: bool  # the cache existed (finished or not) before this run
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    samples: int = 0
    real_tokens: int = 0
    bytes_on_disk: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    blocks_planned: int = 0

    @property
    def already_complete(self) -> bool:
        return self.resumed and self.samples == 0

    @property
    def blocks_repaired(self) -> int:
        return sum(s.blocks_repaired for s in self.splits.values())


class _Writer:
    """One background thread that writes finished blocks in order; errors surface on the next call.
    After any error (its own, or the caller's: close(check=False)) the queued blocks are dropped,
    not written: the error may be a lost lease. The cache's writer checks the lease before each
    block (BlockWriter's fence)."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # bounds memory to ~2 blocks in flight
        self.error: BaseException | None = None
        self.dropping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None and not self.dropping:
                try:
                    self.writer.write_block(*item)
                except BaseException as exc:  # handed to the main thread
                    self.error = exc

    def put(self, item):
        self._check()
        self.queue.put(item)

    def close(self, check: bool = True):
        """Finish the queued blocks. With check=False (an error is already on its way out) they are
        dropped instead, and the writer's own error, if any, is not raised over it."""
        self.dropping = not check
        self.queue.put(None)
        self.thread.join()
        if check:
            self._check()

    def _check(self):
        if self.error is not None:
            raise self.error


@dataclass
class Plan:
    """What one extraction run does: the model, the data in storage order, the blocks to write."""

    backbone: Backbone
    dataset: object
    tokenized: dict
    tiers: list[int]
    manifest: dict
    device: str


def planned_manifest(pipeline: Pipeline, request=None) -> dict:
    """What the cache this pipeline extracts will hold, short of what needs the model's weights or
    the tokens (module hashes, token counts): enough to check a training request or a sweep's space
    against it before anything is extracted. Without module hashes, pooling assumes the weights
    have a pooler: `cls-pooler` on weights without one is still refused only by training."""
    request = request or read_request(pipeline)
    cfg, num_layers = pipeline.extract, request.config.num_hidden_layers
    cut = num_layers - cfg.late_layers
    if cut < 1:  # as in training (setup.make_spec): a cut at h[0] would cache no early layer
        raise SherlError(f"extract.late_layers = {cfg.late_layers} is more than the backbone's {num_layers} "
                         f"layers allow: at least one must stay early (cached); set extract.late_layers to at "
                         f"most {num_layers - 1}")
    return {**request.described, "cut": cut, "late_layers": cfg.late_layers, "tiers": resolve_tiers(cfg.tiers, cut)}


def check_serves_training(pipeline: Pipeline, planned: dict, overwrite: bool) -> None:
    """Refuse, before extracting, a cache the pipeline's own `run` could not use: a split it reads
    (train, train.eval_split, evaluate.split) that the cache will not have, or tiers the method
    reads that its cut and tiers cannot serve. An existing cache that serves the training is left
    to open_writer's message (keep its extract.late_layers), unless it is to be overwritten."""
    splits, where = list(planned["splits"]), f"the cache extract.* describes ({pipeline.extract.cache})"
    try:
        check_splits(pipeline.train, splits, where)
        if pipeline.evaluate.split not in splits:
            raise SherlError(f"evaluate.split = '{pipeline.evaluate.split}': {where} will have no such split (has: "
                             f"{', '.join(splits)}); set evaluate.split to one of them")
        fresh = overwrite or not _existing_cache_serves(pipeline)
        spec = make_spec(pipeline.train, planned if fresh else Cache(pipeline_location(pipeline)).manifest)
        check_phase_splits(spec, pipeline.train, splits, where)
    except SherlError as exc:
        raise SherlError(f"{exc} (checked before extracting; nothing was extracted)") from None


def _existing_cache_serves(pipeline: Pipeline) -> bool:
    loc = pipeline_location(pipeline)
    try:
        return is_sherl_cache(loc) and serves(Cache(loc).manifest, pipeline)
    except SherlError:
        return False


def serves(manifest: dict, pipeline: Pipeline) -> bool:
    """Whether a cache holds every tier the pipeline's training method reads (its other refusals,
    a pooling the backbone lacks, are not the cache's)."""
    try:
        pipeline.train.plugin.spec_options(pipeline.train.options, manifest)
    except SherlError:
        return False
    return True


def prepare(pipeline: Pipeline, timings: dict, overwrite: bool, check=None, log=print) -> Plan:
    """Data, settings and the cache folder are checked before the model loads (with CHECK, also
    what the caller will do with the cache, see extract); then the model, tokens, manifest."""
    cfg = pipeline.extract
    t = time.perf_counter()
    request = read_request(pipeline)
    timings["data"] = time.perf_counter() - t
    planned = planned_manifest(pipeline, request)
    if check is not None:
        check(pipeline, planned, overwrite)
    cut, tiers = planned["cut"], planned["tiers"]
    check_target(pipeline_location(pipeline), overwrite)
    device = pick_device(pipeline.backbone.device)
    check_extract_precision(cfg.precision, device, log)
    t = time.perf_counter()
    backbone = Backbone(pipeline.backbone.source, pipeline.backbone.attn_implementation, device)
    timings["model_load"] = time.perf_counter() - t
    t = time.perf_counter()
    dataset = request.dataset
    tokenized = {name: tokenize(backbone.tokenizer, s, pipeline.backbone.max_length)
                 for name, s in dataset.splits.items()}
    timings["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    manifest = build_manifest(pipeline, backbone.identity(), tokenizer_identity(backbone.folder, backbone.tokenizer),
                              dataset, tokenized, cut, tiers)
    timings["hash"] = time.perf_counter() - t
    for name in list(dataset.splits):  # the manifest fingerprints data order; storage is by length
        dataset.splits[name], tokenized[name] = reorder(dataset.splits[name], tokenized[name],
                                                        storage_order(tokenized[name].lengths))
    return Plan(backbone, dataset, tokenized, tiers, manifest, device)


def open_writer(pipeline: Pipeline, plan: Plan, overwrite: bool, log) -> CacheWriter:
    """The cache's writer, or the reason an existing cache cannot be reused."""
    try:
        return CacheWriter(pipeline_location(pipeline), plan.manifest, overwrite=overwrite, log=log,
                           lease_seconds=pipeline.extract.lease_seconds)
    except CacheMismatch as exc:
        if exc.diffs and {d.path[0] for d in exc.diffs} <= CUT_FIELDS:
            raise CacheMismatch(cut_mismatch_message(pipeline, exc.diffs), exc.diffs) from None
        raise


def cut_mismatch_message(pipeline: Pipeline, diffs) -> str:
    """When only the cut differs, say whether the cache already serves the training request."""
    cache = Cache(pipeline_location(pipeline))
    m = cache.manifest
    have = f"extract.late_layers = {m['late_layers']}, tiers {m['tiers']}"
    asks = pipeline.train.plugin.asks(pipeline.train.options, m["backbone"]["num_layers"])
    if serves(m, pipeline):
        return (f"cache {cache.path}: was extracted with {have}; it already serves {asks}, all stored: keep "
                f"extract.late_layers = {m['late_layers']} (and extract.tiers) to reuse it, or use --overwrite "
                f"to re-extract")
    return (f"cache {cache.path}: was extracted with {have}; it does not serve {asks}, not all stored: "
            f"use --overwrite to re-extract it, or choose another extract.cache path")


def plan_blocks(writer: CacheWriter, plan: Plan, cfg, summary: ExtractSummary) -> list[tuple[str, int]]:
    """Create the split arrays (or check them) and list the blocks still to write."""
    compressors = make_compressors(cfg.codec, cfg.clevel, stored_dtype(cfg.dtype))
    label_dtype = "int64" if plan.dataset.task_type == "classification" else "float32"
    pad_id = plan.backbone.tokenizer.pad_token_id or 0
    blocks = []
    for name, split in plan.dataset.splits.items():
        tok = plan.tokenized[name]
        writer.create_split(name, len(split), tok.max_len, stored_width(plan.backbone.config.hidden_size, cfg.dtype),
                            plan.tiers, stored_dtype(cfg.dtype),
                            compressors, cfg.chunk_size, cfg.time_chunk, label_dtype, pad_id, tok.types is not None)
        pending, repaired = writer.pending_blocks(name)
        summary.splits[name] = SplitSummary(blocks_total=plan.manifest["splits"][name]["blocks"],
                                            blocks_repaired=repaired)
        blocks += [(name, b) for b in pending]
    return blocks


def block_job(pipeline: Pipeline, plan: Plan, writer: CacheWriter | None = None) -> BlockJob:
    """What every block of this extraction shares, with the paths a worker elsewhere must be given
    made absolute (and the storage options, in memory only); WRITER's data location and lease
    generation, which a worker checks before each block."""
    import uuid


    absolute = absolute_paths(pipeline)
    b = absolute.backbone
    return BlockJob(pipeline_location(absolute), b.source, b.attn_implementation, b.device, tuple(plan.tiers),
                    pipeline.extract.batch_size, pipeline.extract.dtype, pipeline.extract.time_chunk,
                    plan.manifest["backbone"]["module_hashes"], str(pipeline.extract.cache), uuid.uuid4().hex[:8],
                    pipeline.extract.precision, data=None if writer is None else writer.data.absolute(),
                    generation=getattr(writer.lock, "generation", None) if writer is not None else None)


def count_block(summary: ExtractSummary, progress, split: str, samples: int, tokens: int) -> None:
    s = summary.splits[split]
    s.samples += samples
    s.blocks_written += 1
    summary.samples += samples
    summary.real_tokens += tokens
    if progress is not None:
        if hasattr(progress, "set_postfix"):
            done = sum(x.blocks_written for x in summary.splits.values())
            progress.set_postfix(blocks=f"{done}/{summary.blocks_planned}")
        progress(samples)


def write_blocks(writer: CacheWriter, plan: Plan, blocks, cfg, summary: ExtractSummary, progress,
                 job: BlockJob) -> None:
    """The blocks in this process: the forward pass here, a background thread writing."""
    bg = _Writer(writer)
    ok = False
    try:
        with torch.inference_mode():
            for name, b in blocks:
                task = make_task(plan, name, b, cfg.chunk_size)
                arrays = compute_block(plan.backbone, job, task, plan.device)
                writer.check_lock()  # before the block is handed on, not after
                bg.put((name, b, task.block * cfg.chunk_size, arrays))
                count_block(summary, progress, name, task.samples, int(task.lengths.sum()))
        ok = True
    finally:
        bg.close(check=ok)


def write_blocks_on_cluster(writer: CacheWriter, plan: Plan, blocks, cfg, summary: ExtractSummary, progress,
                            job: BlockJob, scheduler: str | None, log, started=None) -> None:
    """The blocks as tasks on a dask cluster (distributed_extract.py; STARTED: a local one started
    as the extraction began)."""
    # dask.distributed (about 0.25 s to import) only when workers are asked for
    from sherl_pipe.distributed_extract import extraction_cluster, run_blocks

    with extraction_cluster(cfg.workers, scheduler, cfg.threads, started) as (client, where):
        log(f"extract: {len(blocks)} block(s) on {where}")
        tasks = (make_task(plan, name, b, cfg.chunk_size) for name, b in longest_first(plan, blocks, cfg.chunk_size))
        run_blocks(client, job, tasks, lambda c: count_block(summary, progress, c["split"], c["samples"], c["tokens"]),
                   writer.check_lock)


def longest_first(plan: Plan, blocks, chunk_size: int) -> list[tuple[str, int]]:
    """The blocks by their padded tokens, most first. Storage order runs from short samples to
    long, so handing blocks out in it left the longest for last and one worker running them alone
    while the others idled (4,000 SST-2 rows on 2 workers: the last blocks took 1.2 s each, the
    first 0.2 s); longest first, the last to finish are the shortest and the workers end together."""
    def padded_tokens(item) -> int:
        name, b = item
        lengths = plan.tokenized[name].lengths[b * chunk_size:(b + 1) * chunk_size]
        return len(lengths) * int(lengths.max(initial=0))

    return sorted(blocks, key=padded_tokens, reverse=True)


def require_done(writer: CacheWriter, plan: Plan) -> None:
    """After the blocks: every split's `done` flags read back, all set (the proof of completeness
    the readers trust; a block a worker claimed but did not mark is an error, never a silent gap)."""
    cache = Cache(writer.location)
    for name in plan.dataset.splits:
        done, total = cache.blocks_done(name)
        if done != total:
            raise SherlError(f"cache {writer.path}: split '{name}' has {done}/{total} blocks done after every block "
                             f"was written; rerun the command to redo the others")


def write_cache(pipeline: Pipeline, plan: Plan, overwrite: bool, progress, log, scheduler: str | None,
                started) -> tuple[ExtractSummary, object]:
    """The blocks still to write, written (here, or on the cluster: STARTED, SCHEDULER's, or a new
    one) and checked done: (summary, the cache's location)."""
    cfg = pipeline.extract
    writer = open_writer(pipeline, plan, overwrite, log)
    try:
        summary = ExtractSummary(cache=str(cfg.cache), resumed=writer.resumed)
        blocks = plan_blocks(writer, plan, cfg, summary)
        if progress is not None and hasattr(progress, "set_total"):
            progress.set_total(sum(min(cfg.chunk_size, len(plan.dataset.splits[n]) - b * cfg.chunk_size)
                                   for n, b in blocks))
        summary.blocks_planned = len(blocks)
        t_blocks = time.perf_counter()
        job = block_job(pipeline, plan, writer)
        if blocks and (scheduler or cfg.workers > 1):
            write_blocks_on_cluster(writer, plan, blocks, cfg, summary, progress, job, scheduler, log, started)
        else:
            write_blocks(writer, plan, blocks, cfg, summary, progress, job)
        summary.timings["blocks"] = time.perf_counter() - t_blocks
        require_done(writer, plan)
    finally:
        writer.close()
    return summary, writer.location


def early_cluster(pipeline: Pipeline, scheduler: str | None, overwrite: bool):
    """The local cluster extract.workers > 1 asks for, started now in the background
    (distributed_extract.ClusterStart), or None: the blocks run in this process or on SCHEDULER's
    cluster, or the cache is complete already (a rerun that writes nothing starts no cluster)."""
    if scheduler or pipeline.extract.workers <= 1 or (not overwrite and _complete(pipeline)):
        return None
    from sherl_pipe.distributed_extract import ClusterStart  # dask: imported only when workers are asked for

    b = absolute_paths(pipeline).backbone
    return ClusterStart(pipeline.extract.workers, (b.source, b.attn_implementation, b.device))


def _complete(pipeline: Pipeline) -> bool:
    try:
        return Cache(pipeline_location(pipeline)).is_complete()
    except Exception:  # noqa: BLE001 - absent, partial or unreadable: the extraction itself decides and says why
        return False


def extract(pipeline: Pipeline, overwrite: bool = False, progress=None, log=print, check=None,
            scheduler: str | None = None) -> ExtractSummary:
    """Run stage one for the pipeline; `progress(n_samples)` is called as blocks finish. The blocks
    run in this process (extract.workers = 1), on a local dask cluster (extract.workers = N), or on
    the cluster at SCHEDULER, whose workers reach the cache and the backbone at the same places.
    `check(pipeline, planned_manifest, overwrite)`, if given, runs once the data is read and before
    the model loads: what the caller will do with the cache (`run`: check_serves_training; `sweep`:
    its space), refused before a long extraction, with the data read once.

    The caller sets torch's thread count (the CLI: extract.threads)."""
    cfg = pipeline.extract
    t_start = time.perf_counter()
    set_codec_threads(cfg.codec_threads)
    timings: dict[str, float] = {}
    started = early_cluster(pipeline, scheduler, overwrite)
    try:
        plan = prepare(pipeline, timings, overwrite, check, log)
        t_write = time.perf_counter()  # from here on: the per-sample work, measured by the benchmark
        summary, location = write_cache(pipeline, plan, overwrite, progress, log, scheduler, started)
    finally:
        if started is not None:
            started.close()
    summary.timings.update(timings)
    summary.timings["extract"] = time.perf_counter() - t_write
    summary.bytes_on_disk = Cache(location).bytes_on_disk()
    summary.seconds = time.perf_counter() - t_start
    return summary
