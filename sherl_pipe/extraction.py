"""Stage one: run the frozen early layers once over every split and cache the tiers.

Each split is stored sorted by length, so every block of `chunk_size` samples (exactly one Zarr
chunk along samples) holds samples of similar length: its forward batches are trimmed to their
longest member, and only the time chunks up to the block's longest sample are filled, compressed
and written. While block b+1 runs through the model, a writer thread
compresses and writes block b (blosc and zstd release the GIL), then sets its `done` flag.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sherl_pipe.backbone import Backbone, tokenizer_identity
from sherl_pipe.cache import (FP16_MAX, Cache, CacheWriter, make_compressors, set_codec_threads, tier_name,
                              whole_time_chunks)
from sherl_pipe.cache.manifest import build_manifest
from sherl_pipe.config import Pipeline
from sherl_pipe.data import Split, load_dataset
from sherl_pipe.devices import pick_device
from sherl_pipe.errors import SherlError


@dataclass
class Tokenized:
    ids: list[np.ndarray]
    types: list[np.ndarray] | None
    lengths: np.ndarray

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())


def tokenize(tokenizer, split: Split, max_length: int) -> Tokenized:
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length,
                    return_attention_mask=False)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    types = None
    if split.pairs is not None and "token_type_ids" in enc:
        types = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
    return Tokenized(ids, types, np.asarray([len(x) for x in ids], dtype=np.int32))


def storage_order(lengths: np.ndarray) -> np.ndarray:
    """The order samples are stored in: by length, ties in a fixed pseudo-random order.

    Breaking ties at random (with a constant seed, so reruns and resumes store the same order)
    makes every chunk a random draw from its length range: a file sorted by label or by source
    would otherwise give chunks, and so the loader's batches, of a single class."""
    tiebreak = np.random.default_rng(0).permutation(len(lengths))
    return np.lexsort((tiebreak, lengths))


def reorder(split: Split, tok: Tokenized, order: np.ndarray) -> tuple[Split, Tokenized]:
    split = Split(split.name, split.source, [split.texts[i] for i in order],
                  None if split.pairs is None else [split.pairs[i] for i in order],
                  split.labels[order], split.row_ids[order])
    tok = Tokenized([tok.ids[i] for i in order], None if tok.types is None else [tok.types[i] for i in order],
                    tok.lengths[order])
    return split, tok


def block_width(tok: Tokenized, idx: np.ndarray, time_chunk: int) -> int:
    """Time positions a block fills: its longest sample, rounded up to whole time chunks."""
    return whole_time_chunks(int(tok.lengths[idx].max()), time_chunk, tok.max_len)


def resolve_tiers(requested: tuple[int, ...], cut: int) -> list[int]:
    bad = [t for t in requested if not 0 <= t <= cut]
    if bad:
        raise SherlError(f"extract.tiers: tier {bad[0]} is outside h[0..{cut}] (cut c = L - late_layers = {cut})")
    return sorted(set(requested) | {cut}) if requested else list(range(cut + 1))


def pad_batch(rows: list[np.ndarray], pad_id: int, width: int | None = None, dtype=np.int64) -> np.ndarray:
    width = width or max(len(r) for r in rows)
    out = np.full((len(rows), width), pad_id, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def forward_batches(tok: Tokenized, idx: np.ndarray, batch_size: int, pad_id: int, device):
    """The forward batches of one block: similar lengths together, each trimmed to its longest.

    Yields (positions within the block, input_ids, attention_mask, token_type_ids or None)."""
    order = np.argsort(-tok.lengths[idx], kind="stable")  # longest first
    for s in range(0, len(order), batch_size):
        pos = order[s:s + batch_size]
        rows = idx[pos]
        ids = torch.from_numpy(pad_batch([tok.ids[i] for i in rows], pad_id)).to(device)
        lengths = torch.from_numpy(tok.lengths[rows]).long()
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long().to(device)
        types = None
        if tok.types is not None:
            types = torch.from_numpy(pad_batch([tok.types[i] for i in rows], 0)).to(device)
        yield pos, ids, mask, types


def forward_block(backbone: Backbone, tok: Tokenized, idx: np.ndarray, tiers: list[int], width: int,
                  batch_size: int, dtype: str, device, where: str) -> dict[str, np.ndarray]:
    """Tiers for the samples `idx`, as (len(idx), width, D) arrays with zeros past each length."""
    d = backbone.config.hidden_size
    out = {tier_name(t): np.zeros((len(idx), width, d), dtype=np.dtype(dtype)) for t in tiers}
    pad_id = backbone.tokenizer.pad_token_id or 0
    for pos, ids, mask, types in forward_batches(tok, idx, batch_size, pad_id, device):
        states = backbone.early_states(ids, mask, types, upto=max(tiers))
        keep = mask[..., None].to(states[0].dtype)
        for t in tiers:
            h = states[t] * keep  # padded positions are exactly zero in the cache
            if dtype == "float16":
                peak = float(h.abs().amax())
                if not peak <= FP16_MAX:  # also catches NaN
                    raise SherlError(f"{where}: tier h[{t}] has values up to {peak:g}, beyond float16's range; "
                                     f"set extract.dtype = 'float32'")
            elif not bool(torch.isfinite(h).all()):
                raise SherlError(f"{where}: tier h[{t}] has non-finite values; the backbone's weights are broken")
            out[tier_name(t)][pos, : h.shape[1]] = h.to(dtype=getattr(torch, dtype)).cpu().numpy()
    return out


@dataclass
class SplitSummary:
    samples: int = 0
    blocks_written: int = 0
    blocks_total: int = 0


@dataclass
class ExtractSummary:
    cache: str
    resumed: bool
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    samples: int = 0
    real_tokens: int = 0
    bytes_on_disk: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


class _Writer:
    """One background thread that writes finished blocks in order; errors surface on the next call."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # bounds memory to ~2 blocks in flight
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_block(*item)
                except BaseException as exc:  # handed to the main thread
                    self.error = exc

    def put(self, item):
        self._check()
        self.queue.put(item)

    def close(self):
        self.queue.put(None)
        self.thread.join()
        self._check()

    def _check(self):
        if self.error is not None:
            raise self.error


def extract(pipeline: Pipeline, overwrite: bool = False, progress=None) -> ExtractSummary:
    """Run stage one for the pipeline; `progress(n_samples)` is called as blocks finish."""
    cfg = pipeline.extract
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    set_codec_threads(cfg.codec_threads)
    device = pick_device(pipeline.backbone.device)
    timings = {}

    t = time.perf_counter()
    backbone = Backbone(pipeline.backbone.source, pipeline.backbone.attn_implementation, device)
    timings["model_load"] = time.perf_counter() - t
    cut = backbone.num_layers - cfg.late_layers
    if cut < 0:
        raise SherlError(f"extract.late_layers = {cfg.late_layers} is more than the backbone's "
                         f"{backbone.num_layers} layers")
    tiers = resolve_tiers(cfg.tiers, cut)

    t = time.perf_counter()
    dataset = load_dataset(pipeline.data, cfg.splits)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
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

    t_write = time.perf_counter()  # from here on: the per-sample work, measured by the benchmark
    writer = CacheWriter(cfg.cache, manifest, overwrite=overwrite)
    summary = ExtractSummary(cache=str(cfg.cache), resumed=writer.resumed, timings=timings)
    compressors = make_compressors(cfg.codec, cfg.clevel, cfg.dtype)
    label_dtype = "int64" if dataset.task_type == "classification" else "float32"
    pad_id = backbone.tokenizer.pad_token_id or 0

    plan = []
    for name, split in dataset.splits.items():
        tok = tokenized[name]
        writer.create_split(name, len(split), tok.max_len, backbone.config.hidden_size, tiers, cfg.dtype,
                            compressors, cfg.chunk_size, cfg.time_chunk, label_dtype, pad_id, tok.types is not None)
        pending = writer.pending_blocks(name)
        summary.splits[name] = SplitSummary(blocks_total=manifest["splits"][name]["blocks"])
        plan += [(name, b) for b in pending]
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(sum(min(cfg.chunk_size, len(dataset.splits[n]) - b * cfg.chunk_size) for n, b in plan))

    t_blocks = time.perf_counter()
    bg = _Writer(writer)
    try:
        with torch.inference_mode():
            for name, b in plan:
                split, tok = dataset.splits[name], tokenized[name]
                start = b * cfg.chunk_size
                idx = np.arange(start, min(start + cfg.chunk_size, len(split)))
                width = block_width(tok, idx, cfg.time_chunk)
                arrays = forward_block(backbone, tok, idx, tiers, width, cfg.batch_size, cfg.dtype,
                                       device, f"cache {cfg.cache}, split '{name}', block {b}")
                arrays["input_ids"] = pad_batch([tok.ids[i] for i in idx], pad_id, width, np.int32)
                if tok.types is not None:
                    arrays["token_type_ids"] = pad_batch([tok.types[i] for i in idx], 0, width, np.int8)
                arrays["lengths"] = tok.lengths[idx]
                arrays["labels"] = split.labels[idx]
                arrays["row_ids"] = split.row_ids[idx]
                bg.put((name, b, start, arrays))
                s = summary.splits[name]
                s.samples += len(idx)
                s.blocks_written += 1
                summary.samples += len(idx)
                summary.real_tokens += int(tok.lengths[idx].sum())
                if progress is not None:
                    progress(len(idx))
    finally:
        bg.close()
    timings["blocks"] = time.perf_counter() - t_blocks
    timings["extract"] = time.perf_counter() - t_write
    summary.bytes_on_disk = Cache(cfg.cache).bytes_on_disk()
    summary.seconds = time.perf_counter() - t_start
    return summary
