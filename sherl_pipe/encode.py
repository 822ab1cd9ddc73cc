"""Stage one's primitives: tokenizing a split, the order samples are stored in, and the early
layers' forward pass over one block of samples. The coordinator (extraction.py), a block on any
worker (blocks.py) and predict (prediction.py) share them, so a cache, a dask worker's block and a
prediction tokenize, batch and round their states alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sherl_pipe.backbone import Backbone
from sherl_pipe.cache import tier_name
from sherl_pipe.data import Split
from sherl_pipe.formats import stored_dtype, stored_width, to_storage


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
                  batch_size: int, dtype: str, device, where: str, precision: str = "fp32") -> dict[str, np.ndarray]:
    """Tiers for the samples `idx`, as (len(idx), width, D) arrays with zeros past each length,
    computed in PRECISION (extract.precision) and stored in DTYPE."""
    d = stored_width(backbone.config.hidden_size, dtype)
    out = {tier_name(t): np.zeros((len(idx), width, d), dtype=np.dtype(stored_dtype(dtype))) for t in tiers}
    pad_id = backbone.tokenizer.pad_token_id or 0
    for pos, ids, mask, types in forward_batches(tok, idx, batch_size, pad_id, device):
        states = backbone.early_states(ids, mask, types, upto=max(tiers), precision=precision)
        for t in tiers:
            h = to_storage(states[t], mask, dtype, where, t)
            out[tier_name(t)][pos, : h.shape[1]] = h.cpu().numpy()
    return out
