"""Does the batch policy cost accuracy? SHERL from the cache on SST-2 (all of train.tsv, tested on
test.tsv, the 872-sentence GLUE validation set) with train.batching = bucketed (batches from a
length band of the length-sorted cache) and shuffled (a uniform shuffle of the split), the same
seeds, one epoch each, k = 1, every other setting at its default; last epoch's weights, no selection.

Prints test accuracy per policy (mean +- sd over seeds), the 95% interval (seeds and test rows) of the
difference (shuffled - bucketed), the epoch time and peak RSS of each, and how much the lengths
within a batch vary under each policy. Results append to a JSONL file, so an interrupted run
resumes. The last line is one JSON object.

    python benchmarks/batching.py              # about 25 minutes on 2 CPU cores
    python benchmarks/batching.py --rows 4000 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA, Jobs, add_job_args, extract_job, load_avg, mean_sd, seed_and_row_interval,  # noqa: E402
                    sst2_pipeline_text, train_job)

POLICIES = ("bucketed", "shuffled")


def length_spread(pipe_file: str) -> dict:
    """Median over batches of (longest - shortest) real length, for each policy, first epoch."""
    import numpy as np

    from sherl_pipe.cache import Cache
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.training.setup import make_spec, source_for

    pipe = load_pipeline(pipe_file)
    cache = Cache(pipe.extract.cache)
    source = source_for(cache, "train", make_spec(pipe.train, cache.manifest))
    out = {}
    for policy in POLICIES:
        cfg = pipe.train
        plan = source.sampler(cfg.batch_size, cfg.buffer_chunks, cfg.buffer_mb, 0, policy).batches(0)
        spread = [int(source.lengths[b].max() - source.lengths[b].min()) for b in plan]
        padding = [1 - source.lengths[b].sum() / (len(b) * source.lengths[b].max()) for b in plan]
        out[policy] = {"median_length_range": float(np.median(spread)), "padding_share": float(np.mean(padding))}
    return out


def report(runs: dict, seeds: list[int], spread: dict, rows: int, epochs: int) -> dict:
    print(f"\nSHERL on SST-2 ({rows or 'all'} training rows, {epochs} epoch(s), test.tsv, seeds {seeds}; "
          f"median [min, max] where timed):")
    out = {}
    for policy in POLICIES:
        acc = [r["test_accuracy"] for r in runs[policy]]
        sec = [r["seconds"] for r in runs[policy]]
        m, sd = mean_sd(acc)
        print(f"  {policy:<9} accuracy {100 * m:.2f} +- {100 * sd:.2f} {[round(100 * a, 2) for a in acc]}; "
              f"epoch {statistics.median(sec):.1f} s [{min(sec):.1f}, {max(sec):.1f}]; peak RSS "
              f"{max(r['peak_rss_mb'] for r in runs[policy]):.0f} MB; length range in a batch (median) "
              f"{spread[policy]['median_length_range']:.0f} tokens, padding {100 * spread[policy]['padding_share']:.1f}%")
        out.update({f"{policy}_acc": round(m, 4), f"{policy}_acc_sd": round(sd, 4),
                    f"{policy}_epoch_s": round(statistics.median(sec), 1),
                    f"{policy}_peak_mb": round(max(r["peak_rss_mb"] for r in runs[policy]), 1)})
    diff, lo, hi = seed_and_row_interval([r["correct"] for r in runs["shuffled"]], [r["correct"] for r in runs["bucketed"]])
    print(f"  shuffled - bucketed: {100 * diff:+.2f} points, 95% interval (seeds and test rows) "
          f"[{100 * lo:+.2f}, {100 * hi:+.2f}]")
    return {**out, "shuffled_minus_bucketed_points": round(100 * diff, 2),
            "ci95_points": [round(100 * lo, 2), round(100 * hi, 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/batching"))
    ap.add_argument("--rows", type=int, default=0, help="training rows (0: all of train.tsv)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:  # inside a job process
        out = extract_job(args.pipe) if args.job == "extract" else train_job(args.pipe, args.set)
        print(json.dumps(out))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    work = args.work / (f"rows{args.rows}" if args.rows else "all")
    work.mkdir(parents=True, exist_ok=True)
    pipe = work / "pipeline.toml"
    pipe.write_text(sst2_pipeline_text(args, work / "cache"))
    print(load_avg(), flush=True)
    job = Jobs(__file__, work / "results.jsonl")
    job("extract", ["--job", "extract", "--pipe", str(pipe)])
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {p: [] for p in POLICIES}
    for i, seed in enumerate(seeds):  # the two policies take turns, the order reversed every other seed
        for policy in (POLICIES if i % 2 == 0 else POLICIES[::-1]):
            runs[policy].append(job(f"{policy}-{seed}", [
                "--job", "train", "--pipe", str(pipe), "--set", f"train.batching={policy}",
                "--set", f"train.seed={seed}", "--set", f"train.run_dir={work / 'runs' / f'{policy}-{seed}'}"]))
    summary = report(runs, seeds, length_spread(str(pipe)), args.rows, args.epochs)
    print(load_avg())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
