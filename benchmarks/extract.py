"""Extraction cost against the bare early-layer forward pass, and bytes on disk against raw fp16.

Over the same pre-tokenized forward batches (SST-2 train rows, MiniLM, all tiers, fp16):
  forward  - embeddings + early layers only, under inference_mode, no conversion or storage;
  extract  - the full stage one from cache creation (manifest write) to the last block's done flag:
             forward, masking, fp16 conversion and range check, compression, writes.
Each repeat runs the two back to back (--repeats, default 5); extract_over_forward is the median of
the per-repeat ratios, printed with their range and the machine's load average before and after
(`os.getloadavg()`: a figure taken under load can be discarded). Fixed costs (imports, model load,
data, tokenization, hashing) are reported separately. The last line is one JSON object.

    python benchmarks/extract.py --rows 4000
"""

from __future__ import annotations

import time

T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_avg  # noqa: E402
import torch  # noqa: E402

from sherl_pipe.backbone import Backbone  # noqa: E402
from sherl_pipe.cache import Cache  # noqa: E402
from sherl_pipe.config import ExtractConfig, load_pipeline  # noqa: E402
from sherl_pipe.data import load_dataset  # noqa: E402
from sherl_pipe.encode import forward_batches, reorder, storage_order, tokenize  # noqa: E402
from sherl_pipe.extraction import extract  # noqa: E402

IMPORT_S = time.perf_counter() - T_IMPORT
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    defaults = ExtractConfig()  # the product's defaults unless a flag says otherwise
    ap.add_argument("--codec", default=defaults.codec)
    ap.add_argument("--clevel", type=int, default=defaults.clevel)
    ap.add_argument("--time-chunk", type=int, default=defaults.time_chunk)
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"benchmark skipped: {args.data} is absent (pass --data PATH to SST-2 train.tsv)")

    tmp = Path(tempfile.mkdtemp(prefix="sherl-bench-"))
    try:  # the cache is hundreds of MB: never left behind, also when a run fails or is interrupted
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    pipe_file = tmp / "p.toml"
    pipe_file.write_text(f'[data]\ntrain = "{args.data}"\ntext_column = "sentence"\nlimit = {args.rows}\n'
                         f'[extract]\ncache = "{tmp / "cache"}"\nthreads = {args.threads}\ncodec = "{args.codec}"\nclevel = {args.clevel}\ntime_chunk = {args.time_chunk}\n')
    pipe = load_pipeline(str(pipe_file))
    cfg = pipe.extract
    torch.set_num_threads(cfg.threads)

    t = time.perf_counter()
    backbone = Backbone(pipe.backbone.source)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    split = load_dataset(pipe.data).splits["train"]
    data_s = time.perf_counter() - t
    t = time.perf_counter()
    tok = tokenize(backbone.tokenizer, split, pipe.backbone.max_length)
    split, tok = reorder(split, tok, storage_order(tok.lengths))
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    backbone.module_hashes()
    hash_s = time.perf_counter() - t
    cut = backbone.num_layers - cfg.late_layers
    pad_id = backbone.tokenizer.pad_token_id
    n = len(split)
    # The exact forward batches extraction runs: per block, by length, trimmed to the longest.
    batches = [b for start in range(0, n, cfg.chunk_size)
               for b in forward_batches(tok, np.arange(start, min(start + cfg.chunk_size, n)),
                                        cfg.batch_size, pad_id, "cpu")]

    def bare_forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, ids, mask, types in batches:
                backbone.early_states(ids, mask, types, upto=cut)
        return time.perf_counter() - t0

    def full_extract() -> float:
        summary = extract(pipe, overwrite=True)
        return summary.timings["extract"]

    forward_s, extract_s = [], []
    load_before = load_avg()
    bare_forward()  # warm-up: first-call allocations and kernel selection
    for _ in range(args.repeats):  # back to back, so drift in machine speed hits both alike
        forward_s.append(bare_forward())
        extract_s.append(full_extract())
    fwd, ext = statistics.median(forward_s), statistics.median(extract_s)
    ratios = [e / f for e, f in zip(extract_s, forward_s)]
    ratio = statistics.median(ratios)

    cache = Cache(tmp / "cache")
    m = cache.manifest
    tiers = m["tiers"]
    tokens = m["splits"]["train"]["tokens"]
    tier_bytes = sum(cache.bytes_on_disk("train", f"h{t}") for t in tiers)
    hidden = m["backbone"]["hidden_size"]
    real_fp16 = tokens * hidden * 2 * len(tiers)
    stored_raw = n * m["splits"]["train"]["max_len"] * hidden * 2 * len(tiers)

    print(f"data: {n} rows of {args.data.name}, {tokens} real tokens (longest {m['splits']['train']['max_len']}), "
          f"{len(batches)} forward batches of <= {cfg.batch_size}, tiers {tiers}, {cfg.dtype}, {args.codec}, "
          f"{cfg.threads} torch threads")
    print(f"fixed costs: imports {IMPORT_S:.2f} s, model load {load_s:.2f} s, data {data_s:.2f} s, "
          f"tokenization {tok_s:.2f} s, module hashing {hash_s:.2f} s")
    print(f"bare forward: median {fwd:.2f} s ({n / fwd:.1f} samples/s)  runs {[round(x, 2) for x in forward_s]}")
    print(f"extraction:   median {ext:.2f} s ({n / ext:.1f} samples/s)  runs {[round(x, 2) for x in extract_s]}")
    print(f"extract / forward = {ratio:.3f} (median of {len(ratios)} back-to-back pairs) [{min(ratios):.3f}, "
          f"{max(ratios):.3f}]  pairs {[round(r, 3) for r in ratios]}")
    print(f"before: {load_before}; after: {load_avg()}")
    print(f"disk: tiers {tier_bytes / 2**20:.1f} MiB = {tier_bytes / tokens:.0f} B per real token; raw fp16 of "
          f"real tokens {real_fp16 / tokens:.0f} B per token -> {tier_bytes / real_fp16:.3f}x; "
          f"compression of the stored (padded) arrays {stored_raw / tier_bytes:.2f}x")
    print(json.dumps({
        "rows": n, "real_tokens": tokens, "forward_s": round(fwd, 3), "extract_s": round(ext, 3),
        "forward_samples_per_s": round(n / fwd, 1), "extract_samples_per_s": round(n / ext, 1),
        "extract_over_forward": round(ratio, 4), "ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
        "load_avg_before": load_before, "disk_over_real_fp16": round(tier_bytes / real_fp16, 4),
        "compression_ratio": round(stored_raw / tier_bytes, 3),
        "fixed_s": {"imports": round(IMPORT_S, 2), "model_load": round(load_s, 2), "data": round(data_s, 2),
                    "tokenize": round(tok_s, 2), "hash": round(hash_s, 2)},
    }))


if __name__ == "__main__":
    main()
