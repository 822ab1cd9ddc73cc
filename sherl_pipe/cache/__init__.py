"""The cache: a Zarr v3 group holding per-split, per-tier activations and a manifest.

Layout (a local folder, or the same keys under an object-store URL):

    CACHE/zarr.json                 group attributes: {"sherl_pipe": MANIFEST}
    CACHE/<split>/h<t>              (N, T, D) float16|float32, chunks (chunk_size, time_chunk, D);
                                    int8|float8 (lossy): (N, T, D + 4) int8|uint8, each token's D codes
                                    and its float32 scale (sherl_pipe.formats decodes them)
    CACHE/<split>/input_ids         (N, T) int32, padded with the tokenizer's pad id
    CACHE/<split>/token_type_ids    (N, T) int8, only for text pairs
    CACHE/<split>/lengths           (N,) int32, real tokens per sample
    CACHE/<split>/labels            (N,) int64 class ids, or float32 targets
    CACHE/<split>/row_ids           (N,) int64, 0-based data rows of the split's source file
    CACHE/<split>/done              (blocks,) uint8, one chunk per block: 1 once the block is written

Samples are stored sorted by length (ties in a fixed pseudo-random order; `row_ids` map them
back), and the time axis T is the split's longest sample, chunked by `time_chunk` positions.
Positions past a sample's length hold zeros, and since a block's samples have similar lengths, the
time chunks past its longest sample are entirely zero: they are never compressed, written or read.

Modules: `location` (a path or URL and the zarr store it maps to), `access` (reading, writing,
listing keys through that store; a remote store's refusals as one line), `manifest` (what a cache
holds, matching, fingerprint), `codec` (direct chunk encoding and decoding), `store` (reading),
`writer` (creating and writing blocks), `lease` (one writer at a time).
"""

from sherl_pipe.cache.codec import BlockReader, make_compressors, set_codec_threads, whole_time_chunks
from sherl_pipe.cache.manifest import manifest_diff, manifest_fingerprint
from sherl_pipe.cache.store import Cache, is_tier_name, tier_name
from sherl_pipe.cache.writer import CacheWriter

__all__ = ["BlockReader", "Cache", "CacheWriter", "make_compressors", "manifest_diff",
           "manifest_fingerprint", "set_codec_threads", "tier_name", "is_tier_name", "whole_time_chunks"]
