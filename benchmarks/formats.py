"""What lossy tier storage costs: SST-2 (all of train.tsv, tested on test.tsv) extracted as float16,
int8 and float8, then SHERL trained from each cache with the same seeds, one epoch, k = 1, every
other setting at its default, last epoch's weights.

Part `storage`: per format the bytes per real token on disk (tiers of the training split), the
extraction time, the epoch time and test accuracy (mean +- sd over seeds), with the 95% interval
of the accuracy difference against float16 (covering seeds and test sentences).
Part `tiers`: the float16 runs' learned tier weights (mean alpha per tier, averaged over seeds,
from summary.json), then SHERL trained on the top-2 and top-3 tiers by that weight (plus the
anchor, always) against all tiers, same seeds, 95% interval (seeds and test rows) against all tiers.

Results append to a JSONL file (an interrupted run resumes). The last line is one JSON object.

    python benchmarks/formats.py                      # about 35 minutes on 2 CPU cores
    python benchmarks/formats.py --rows 4000 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA, Jobs, accuracy_line, add_job_args, extract_job, load_avg,  # noqa: E402
                    sst2_pipeline_text, train_job, train_runs)

FORMATS = ("float16", "int8", "float8")


def bytes_per_real_token(cache_path: Path) -> float:
    from sherl_pipe.cache import Cache

    cache = Cache(cache_path)
    tokens = cache.manifest["splits"]["train"]["tokens"]
    return sum(cache.bytes_on_disk("train", f"h{t}") for t in cache.tiers) / tokens


def storage_part(args, work: Path, job, seeds: list[int]) -> tuple[dict, dict]:
    runs, sizes, extract_s = {}, {}, {}
    for fmt in FORMATS:
        pipe = work / f"{fmt}.toml"
        pipe.write_text(sst2_pipeline_text(args, work / f"cache-{fmt}", f'dtype = "{fmt}"\n'))
        extract_s[fmt] = job(f"extract-{fmt}", ["--job", "extract", "--pipe", str(pipe)])["seconds"]
        sizes[fmt] = bytes_per_real_token(work / f"cache-{fmt}")
    for i, seed in enumerate(seeds):  # the formats take turns, the order reversed every other seed
        for fmt in (FORMATS if i % 2 == 0 else FORMATS[::-1]):
            runs.setdefault(fmt, []).extend(train_runs(job, work / f"{fmt}.toml", work, fmt, [seed], []))
    print(f"\nstorage formats on SST-2 ({args.rows or 'all'} training rows, {args.epochs} epoch(s), test.tsv, "
          f"seeds {seeds}; median [min, max] where timed):")
    out = {}
    for fmt in FORMATS:
        print(f"  {fmt:<8} {sizes[fmt]:.0f} B per real token ({sizes[fmt] / sizes['float16']:.3f}x float16), "
              f"extraction {extract_s[fmt]:.1f} s")
        got = accuracy_line(fmt, runs[fmt], None if fmt == "float16" else runs["float16"])
        out[fmt] = {"bytes_per_real_token": round(sizes[fmt], 1), "extract_s": round(extract_s[fmt], 1), **got}
    return out, runs


def tiers_part(work: Path, job, seeds: list[int], fp16_runs: list[dict]) -> dict:
    alphas = [json.loads((work / "runs" / f"float16-{s}" / "summary.json").read_text())["tier_weights"]["alpha"]
              for s in seeds]
    mean = {t: statistics.mean(a[t] for a in alphas) for t in alphas[0]}
    ranked = sorted(mean, key=lambda t: -mean[t])
    print("\nlearned tier weights (mean alpha over the float16 runs): "
          + ", ".join(f"{t} {mean[t]:.3f}" for t in ranked))
    out = {"mean_alpha": {t: round(mean[t], 4) for t in ranked}}
    pipe = work / "float16.toml"
    accuracy_line(f"all {len(ranked)} tiers", fp16_runs, None)
    for k in (2, 3):
        chosen = sorted(int(t[1:]) for t in ranked[:k])
        runs = train_runs(job, pipe, work, f"top{k}", seeds, ["--set", f"train.tiers={json.dumps(chosen)}"])
        out[f"top{k}"] = {"tiers": chosen, **accuracy_line(f"top-{k} tiers {chosen}", runs, fp16_runs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/storage"))
    ap.add_argument("--rows", type=int, default=0, help="training rows (0: all of train.tsv)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="storage,tiers",
                    help="storage always runs (the tiers part reads its float16 runs); 'storage' alone skips tiers")
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:  # inside a job process
        print(json.dumps(extract_job(args.pipe) if args.job == "extract" else train_job(args.pipe, args.set)))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    work = args.work / (f"rows{args.rows}" if args.rows else "all")
    work.mkdir(parents=True, exist_ok=True)
    print(load_avg(), flush=True)
    job = Jobs(__file__, work / "results.jsonl")
    seeds = [int(s) for s in args.seeds.split(",")]
    formats, runs = storage_part(args, work, job, seeds)
    summary = {"formats": formats}
    for fmt in ("int8", "float8"):
        summary[f"{fmt}_bytes_over_fp16"] = round(formats[fmt]["bytes_per_real_token"]
                                                  / formats["float16"]["bytes_per_real_token"], 4)
        summary[f"{fmt}_acc_delta"] = formats[fmt]["delta"]
    if "tiers" in args.parts:
        summary["tiers"] = tiers_part(work, job, seeds, runs["float16"])
    print(load_avg())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
