"""Sweeps over one cache, timed as whole `sherl-pipe` commands: SST-2 (the first 5,000 rows of
train.tsv: 4,000 to train on, 1,000 carved out to rank the trials on), all-MiniLM-L6-v2 with k = 1
(one late layer), 8 trials (lr x late tuning), one epoch each.

  (a) one extraction plus the 8 trials from the cache, on 2 workers
  (b) the same 8 trials in live mode (the early layers run in every trial), on 2 workers
  (c) the cached sweep of (a) on 1 worker against 2 workers
Every worker runs one trial at a time with one torch thread, on a core of its own (sherl-pipe
pins the local cluster's workers), so (c) measures the engine's parallelism. Each round runs (a), (b) and (c) back to back, the order reversed every other round;
ratios are the medians of the per-round ratios, with their range. The machine's load average is
printed before and after. The last line is one JSON object with `sweep_cached_over_live` and
`two_workers_over_one`.

    python benchmarks/sweep.py                 # 3 rounds, about 30 minutes on 2 CPU cores
    python benchmarks/sweep.py --rounds 1
    python benchmarks/sweep.py --set train.precision=bf16   # every trial (cached and live) in bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, load_avg  # noqa: E402

SPACE = {"lr": [0.0003, 0.001, 0.003, 0.01], "late_tuning": ["frozen", "norm-bias"]}


def pipeline_text(args, work: Path) -> str:
    space = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SPACE.items())
    return (f'[data]\ntrain = "{args.data / "train.tsv"}"\nvalidation_size = {args.validation}\n'
            f'text_column = "sentence"\nlabel_column = "label"\nlimit = {args.rows + args.validation}\n'
            f'[extract]\ncache = "{work / "cache"}"\nthreads = 2\n'
            f'[train]\nlate_layers = 1\nepochs = 1\nrun_dir = "{work / "run"}"\n'
            f'[sweep]\nsampler = "grid"\nthreads = 1\ndir = "{work / "sweep"}"\n[sweep.space]\n{space}\n')


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sherl_pipe", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sherl-pipe {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def one_round(pipe: Path, work: Path, r: int, common_sets: list[str]) -> dict:
    def sweep(name: str, *sets: str) -> float:
        argv = ["sweep", str(pipe), "-q", "--overwrite", "--sweep-dir", str(work / f"sweep-{name}")]
        for s in (*common_sets, *sets):
            argv += ["--set", s]
        return timed(argv)

    steps = {
        "a": lambda: {"extract": timed(["extract", str(pipe), "-q", "--overwrite"]),
                      "cached_2": sweep("cached-2", "sweep.workers=2")},
        "b": lambda: {"live_2": sweep("live-2", "sweep.workers=2", "train.mode=live")},
        "c": lambda: {"cached_1": sweep("cached-1", "sweep.workers=1")},
    }
    out = {}
    for key in ("a", "b", "c") if r % 2 == 0 else ("c", "b", "a"):
        out.update(steps[key]())
        print(f"  round {r}: {key} done {json.dumps({k: round(v, 1) for k, v in out.items()})}", flush=True)
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/sweep"))
    ap.add_argument("--rows", type=int, default=4000, help="training rows")
    ap.add_argument("--validation", type=int, default=1000, help="validation rows, carved out of train.tsv")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a train.* override for every sweep (cached and live; the extraction runs without "
                         "it), e.g. train.precision=bf16")
    args = ap.parse_args()
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    args.work.mkdir(parents=True, exist_ok=True)
    pipe = args.work / "pipeline.toml"
    pipe.write_text(pipeline_text(args, args.work.resolve()))
    print(load_avg(), flush=True)
    print(f"overrides for every sweep: {', '.join(args.set) or 'none'}", flush=True)
    rounds = [one_round(pipe, args.work.resolve(), r, args.set) for r in range(args.rounds)]
    print(load_avg())
    cached_over_live = [(x["extract"] + x["cached_2"]) / x["live_2"] for x in rounds]
    two_over_one = [x["cached_2"] / x["cached_1"] for x in rounds]
    for key in ("extract", "cached_2", "live_2", "cached_1"):
        print(f"  {key:<9} {spread([x[key] for x in rounds])} s")
    print(f"  sweep_cached_over_live (extraction + cached sweep) / live sweep: {spread(cached_over_live)}")
    print(f"  two_workers_over_one  cached sweep on 2 workers / on 1:          {spread(two_over_one)}")
    print(json.dumps({"sweep_cached_over_live": round(statistics.median(cached_over_live), 4),
                      "two_workers_over_one": round(statistics.median(two_over_one), 4),
                      "overrides": args.set, "rounds": len(rounds), "seconds": rounds}))


if __name__ == "__main__":
    main()
