"""Batches for stage two: one seeded, chunk-aware sampler drives every source, so training from the
cache, live training, full fine-tuning and the in-memory reference all see exactly the same
batches, whatever tiers a method reads.

Two policies (train.batching):
  bucketed  the order of chunks is shuffled, then the samples within a window of a few chunks
            (at most buffer_chunks, and at most buffer_mb of the cache's decoded tiers); as the
            cache is stored by length, a batch holds samples of similar length (little padding).
            A reader holds one window's chunks at a time.
  shuffled  a uniform permutation of the whole split each epoch. Every chunk is then needed all
            epoch long, so the reader holds the whole split's decoded tiers (those the method reads)
            in memory, and batches are padded to their longest sample.
Window sizes count every tier the cache stores, not the ones a method reads, so the batches do not
depend on the method or on train.tiers.

A reader touches each chunk once per epoch. The
cache reader fetches the stored bytes of the coming chunks through the cache's store, many
requests at once (prefetch.py: at most one window's worth, train.buffer_mb, in flight), so an
object store's latency per request does not stall training; it decodes whole chunks in a
background thread, keeps only the chunks the coming batches need, trims every batch to its longest sample and only then decodes it: int8 and float8 codes to
float32; float16 stays float16, since the consolidation converts each tier as it copies it into its
input buffer anyway (a second float32 copy per tier cost a pass over every tier each step). The
trainer gets plain tensors and never touches Zarr.

Decoded chunks live in slabs of one fixed shape (the Zarr chunk: samples x time chunk x width)
that the reader recycles: a chunk needs as many slabs per tier as its longest sample needs time
chunks. Fresh memory for every chunk cost more in page faults than decompressing it, and chunks of
many sizes fragmented the heap; recycled slabs of one size do neither.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from sherl_pipe.cache import BlockReader, Cache, tier_name
from sherl_pipe.formats import LOSSY, decode, nominal_itemsize, through_storage
from sherl_pipe.training.prefetch import Prefetcher

MAX_AHEAD = 64  # chunk requests in flight at most, however small the chunks


def _libc_trim():
    """glibc's malloc_trim, or a no-op elsewhere. Decoded chunks come in many sizes; once freed,
    glibc keeps their pages in fragmented heaps unless asked to give them back."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


release_free_memory = _libc_trim()


class SlabPool:
    """Recycled arrays of one shape. It grows to the most slabs ever held at once and no further."""

    def __init__(self, shape: tuple, dtype):
        self.shape, self.dtype = shape, dtype
        self.free: list[np.ndarray] = []

    def take(self) -> np.ndarray:
        return self.free.pop() if self.free else np.empty(self.shape, dtype=self.dtype)

    def give(self, slabs) -> None:
        self.free.extend(slabs)


@dataclass
class Batch:
    index: np.ndarray  # positions in the split (storage order)
    states: dict[int, torch.Tensor]  # tier -> (B, T_batch, D) float32, or float16 as a float16 cache stores it
    mask: torch.Tensor  # (B, T_batch) int64
    labels: torch.Tensor
    input_ids: torch.Tensor  # (B, T_batch) int64
    token_type_ids: torch.Tensor | None

    def to(self, device) -> "Batch":
        if str(device) == "cpu":
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.index, {k: move(v) for k, v in self.states.items()}, move(self.mask),
                     move(self.labels), move(self.input_ids), move(self.token_type_ids))


class ChunkSampler:
    """The order of samples for each epoch, as batches of positions in the split.

    Windows are consecutive chunks of a seeded chunk permutation: at most `buffer_chunks` chunks
    and, when `chunk_bytes` is given, at most `buffer_bytes` of decoded tiers (at least one chunk)."""

    def __init__(self, n: int, chunk_size: int, batch_size: int, buffer_chunks: int, seed: int,
                 shuffle: bool = True, chunk_bytes: list[int] | None = None, buffer_bytes: int | None = None,
                 policy: str = "bucketed"):
        self.n, self.chunk_size, self.batch_size = n, chunk_size, batch_size
        self.buffer_chunks, self.seed, self.shuffle = max(1, buffer_chunks), seed, shuffle
        self.chunk_bytes, self.buffer_bytes, self.policy = chunk_bytes, buffer_bytes, policy

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def windows(self, chunks) -> list[list[int]]:
        out: list[list[int]] = []
        size = 0
        for c in chunks:
            c = int(c)
            cost = self.chunk_bytes[c] if self.chunk_bytes else 0
            if out and len(out[-1]) < self.buffer_chunks and (
                    self.buffer_bytes is None or size + cost <= self.buffer_bytes):
                out[-1].append(c)
                size += cost
            else:
                out.append([c])
                size = cost
        return out

    def batches(self, epoch: int) -> list[np.ndarray]:
        if not self.shuffle:
            order = np.arange(self.n)
        elif self.policy == "shuffled":
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.concatenate([
                rng.permutation(np.concatenate([np.arange(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n))
                                                for c in window]))
                for window in self.windows(rng.permutation(-(-self.n // self.chunk_size)))])
        return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]


class SplitSource:
    """Batches of one cached split: tiers read from the cache (or preloaded), side arrays from memory."""

    def __init__(self, cache: Cache, split: str, tiers: list[int], read_tiers: bool = True, preload: bool = False,
                 ahead_bytes: int = 32 * 2**20):
        cache.require_complete(split)
        self.cache, self.split, self.tiers = cache, split, list(tiers) if read_tiers else []
        self.chunk_size = cache.manifest["chunk_size"]
        self.format = cache.manifest["dtype"]  # the storage format: lossy codes are decoded when handed out
        self.time_chunk = cache.array(split, tier_name(cache.tiers[-1])).chunks[1]
        self.lengths = cache.read(split, "lengths").astype(np.int64)
        self.labels = cache.read(split, "labels")
        self.input_ids = cache.read(split, "input_ids")
        names = cache.array_names(split)
        self.token_type_ids = cache.read(split, "token_type_ids") if "token_type_ids" in names else None
        self.n = len(self.lengths)
        self.n_chunks = -(-self.n // self.chunk_size)
        self._readers = {t: BlockReader(cache.data, split, tier_name(t), cache.array(split, tier_name(t)))
                         for t in self.tiers}
        self.ahead = self._ahead(ahead_bytes)
        self._preloaded = None
        if preload:
            pool = self._pool()
            chunks = list(range(self.n_chunks))
            fetched = self._prefetcher(chunks)
            self._preloaded = {c: self._read_chunk(c, pool, fetched) for c in chunks}

    def _ahead(self, budget: int) -> int:
        """Requests in flight: as many chunks as AHEAD_BYTES of decoded slabs (the reader's window
        budget, train.buffer_mb: stored chunks are about their decoded size), at least 4."""
        if not self._readers:
            return 1
        reader = next(iter(self._readers.values()))
        slab = int(np.prod(reader.chunk_shape)) * np.dtype(reader.dtype).itemsize
        return int(min(MAX_AHEAD, max(4, budget // max(slab, 1))))

    def _keys(self, chunks) -> list[str]:
        """The store keys of these chunks' tiers, in the order _read_chunk decodes them."""
        return [reader.key(c, j) for c in chunks for reader in self._readers.values()
                for j in range(self._time_chunks(c))]

    def _prefetcher(self, chunks) -> Prefetcher:
        return Prefetcher(self.cache.data, self.cache.store, self._keys(chunks), self.ahead)

    def _pool(self) -> SlabPool | None:
        if not self._readers:
            return None
        reader = next(iter(self._readers.values()))
        return SlabPool(reader.chunk_shape, reader.dtype)

    def _time_chunks(self, c: int) -> int:
        """How many time chunks chunk c holds data in: up to its longest sample."""
        return -(-int(self.lengths[c * self.chunk_size:(c + 1) * self.chunk_size].max()) // self.time_chunk)

    def chunk_bytes(self) -> list[int]:
        """Decoded size of each chunk's tiers as a reader holds them (whole slabs), counted over
        every tier the cache stores: the windows, and so the batches, are the same for every
        method and every choice of train.tiers."""
        d = self.cache.manifest["backbone"]["hidden_size"]
        itemsize = nominal_itemsize(self.cache.manifest["dtype"])
        slab = self.chunk_size * self.time_chunk * d * itemsize
        return [slab * self._time_chunks(c) * len(self.cache.tiers) for c in range(self.n_chunks)]

    def sampler(self, batch_size: int, buffer_chunks: int, buffer_mb: float, seed: int,
                policy: str = "bucketed") -> ChunkSampler:
        return ChunkSampler(self.n, self.chunk_size, batch_size, buffer_chunks, seed,
                            chunk_bytes=self.chunk_bytes(), buffer_bytes=int(buffer_mb * 2**20), policy=policy)

    def _read_chunk(self, c: int, pool: SlabPool, fetched: Prefetcher) -> dict[int, list[np.ndarray]]:
        """Chunk c's tiers: for each, one slab per time chunk up to the chunk's longest sample,
        decoded from the bytes FETCHED hands out (in _keys' order)."""
        n_time = self._time_chunks(c)
        out = {}
        for t, reader in self._readers.items():
            slabs = [pool.take() for _ in range(n_time)]
            for j, slab in enumerate(slabs):
                reader.decode(c, j, fetched.next(reader.key(c, j)), slab)
            out[t] = slabs
        return out

    def make_batch(self, idx: np.ndarray, chunks: dict[int, dict[int, list[np.ndarray]]]) -> Batch:
        width = int(self.lengths[idx].max())
        states = {}
        which = idx // self.chunk_size
        groups = [(int(c), np.flatnonzero(which == c)) for c in np.unique(which)]
        for t, reader in self._readers.items():
            rows = np.zeros((len(idx), width) + reader.chunk_shape[2:], dtype=reader.dtype)
            for c, sel in groups:
                local = idx[sel] % self.chunk_size
                for j, slab in enumerate(chunks[c][t]):  # a chunk holds up to its own longest sample
                    lo = j * self.time_chunk
                    if lo >= width:
                        break
                    hi = min(lo + self.time_chunk, width)
                    rows[sel, lo:hi] = slab[local, :hi - lo]
            states[t] = torch.from_numpy(rows)  # trimmed; decoded when handed out (iterate)
        lengths = torch.from_numpy(self.lengths[idx])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        labels = torch.from_numpy(self.labels[idx])
        ids = torch.from_numpy(self.input_ids[idx, :width].astype(np.int64))
        types = None
        if self.token_type_ids is not None:
            types = torch.from_numpy(self.token_type_ids[idx, :width].astype(np.int64))
        return Batch(idx, states, mask, labels, ids, types)

    def iterate(self, batches: list[np.ndarray], prefetch: int = 8):
        """Yield a Batch for each index array, reading chunks in a background thread. Batches wait
        in the queue in the storage dtype; lossy codes are decoded to float32 when handed out."""
        if not self.tiers:
            for idx in batches:
                yield self.make_batch(idx, {})
            return
        out: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(batches, out, stop), daemon=True)
        thread.start()
        try:
            for _ in range(len(batches)):
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                if self.format in LOSSY:
                    item.states = {t: decode(v, self.format) for t, v in item.states.items()}
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _produce(self, batches, out: queue.Queue, stop: threading.Event) -> None:
        fetched = None
        try:
            last_use: dict[int, int] = {}
            first_use: dict[int, None] = {}  # chunks in the order they are first needed
            for b, idx in enumerate(batches):
                for c in np.unique(idx // self.chunk_size):
                    last_use[int(c)] = b
                    first_use.setdefault(int(c), None)
            pool = self._pool()
            if self._preloaded is None:
                fetched = self._prefetcher(list(first_use))
            held: dict[int, dict[int, list[np.ndarray]]] = {}
            for b, idx in enumerate(batches):
                if stop.is_set():
                    return
                for c in np.unique(idx // self.chunk_size):
                    c = int(c)
                    if c not in held:
                        held[c] = self._preloaded[c] if self._preloaded is not None else self._read_chunk(c, pool,
                                                                                                          fetched)
                batch = self.make_batch(idx, held)
                for c in [c for c in held if last_use[c] <= b]:
                    released = held.pop(c)
                    if self._preloaded is None:
                        for slabs in released.values():
                            pool.give(slabs)
                out.put(batch)
            del pool, held
            release_free_memory()
        except BaseException as exc:  # handed to the consumer
            out.put(exc)
        finally:
            if fetched is not None:
                fetched.close()


class LiveStates:
    """Runs the early layers on a batch's input_ids (no tiers read), stored as the cache stores them
    (padding cleared, rounded through the storage dtype) so live and cached training see the same
    values. Runs in the cache's precision (fp32 unless extract.precision said otherwise), outside
    stage two's autocast, as extraction does."""

    def __init__(self, backbone, tiers: list[int], storage_dtype: str, precision: str = "fp32"):
        self.backbone, self.tiers, self.dtype, self.precision = backbone, list(tiers), storage_dtype, precision

    def __call__(self, batch: Batch) -> Batch:
        # stage two's autocast left outside: the early layers run as the cache's were (extract.precision)
        with torch.inference_mode(), torch.autocast(batch.mask.device.type, enabled=False):
            states = self.backbone.early_states(batch.input_ids, batch.mask, batch.token_type_ids,
                                                upto=max(self.tiers), precision=self.precision)
        # outside inference mode: the converted tiers are ordinary tensors autograd may save
        batch.states = {t: through_storage(states[t], batch.mask, self.dtype, "live early layers", t)
                        for t in self.tiers}
        return batch
