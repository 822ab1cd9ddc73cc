"""What the benchmarks share: the SST-2 data folder, jobs in fresh processes whose results append
to a JSONL file (an interrupted benchmark resumes where it stopped), a training job, and the
statistics (mean +- sd, a 95% interval covering seeds and test sentences)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def sst2_pipeline_text(args, cache: Path, extract_extra: str = "") -> str:
    """SST-2 train.tsv (args.rows of it, 0: all) and test.tsv, a cache, one fixed epoch budget,
    no evaluation during training: the accuracy benchmarks' pipeline."""
    limit = f"limit = {args.rows}\n" if args.rows else ""
    return (f'[data]\ntrain = "{args.data / "train.tsv"}"\ntest = "{args.data / "test.tsv"}"\n'
            f'text_column = "sentence"\nlabel_column = "label"\n{limit}'
            f'[extract]\ncache = "{cache}"\nthreads = {args.threads}\n{extract_extra}'
            f'[train]\nlate_layers = 1\nthreads = {args.threads}\neval_split = ""\nepochs = {args.epochs}\n')


def add_backbone_arg(ap) -> None:
    ap.add_argument("--backbone", type=Path, default=None,
                    help="a Hugging Face folder (benchmarks/get_mpnet.py prints one); default: the embedded MiniLM")


def backbone_section(source: Path | None) -> str:
    """The pipeline's [backbone] table for --backbone; nothing for the embedded default."""
    return f'[backbone]\nsource = "{source.absolute()}"\n' if source else ""


def backbone_tag(source: Path | None) -> str:
    """A work folder's suffix per backbone (its folder's name and a hash of its path: two folders
    of one name are two backbones): each has its own caches and runs."""
    if not source:
        return ""
    import hashlib

    return f"-{source.absolute().name}-{hashlib.sha1(str(source.absolute()).encode()).hexdigest()[:6]}"


def cpu_name() -> str:
    """The CPU's model name and its bf16 matmul support (AMX, AVX-512 BF16), for every figure."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    return f"{name} ({', '.join(bf16) or 'no native bf16'}; {os.cpu_count()} cores)"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_avg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def add_job_args(ap) -> None:
    """The hidden arguments Jobs passes to a job process: `--job NAME --pipe FILE [--set KEY=VALUE ...]`."""
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--pipe", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)


class Jobs:
    """Runs `python SCRIPT --job ...` in a fresh process per job; its last stdout line is the result.
    Finished results are kept in a JSONL file and not run again."""

    def __init__(self, script: str, results_path: Path):
        self.script, self.path = script, results_path
        self.results = {}
        if results_path.is_file():
            rows = (json.loads(x) for x in results_path.read_text().splitlines() if x.strip())
            self.results = {r["key"]: r for r in rows}

    def __call__(self, key: str, argv: list[str]) -> dict:
        if key in self.results:
            print(f"[{key}] from {self.path}", flush=True)
            return self.results[key]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, self.script, *argv], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"job {key} ({argv}) failed:\n{proc.stderr[-3000:]}")
        out = {"key": key, **json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t}
        with open(self.path, "a") as f:
            f.write(json.dumps(out) + "\n")
        self.results[key] = out
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()
                 if k not in ("correct", "hyperparameters")}
        print(f"[{key}] {shown}", flush=True)
        return out


def train_job(pipe_file: str, overrides: list[str]) -> dict:
    """One training run in this process: timing, peak RSS and, when the cache has a test split,
    test accuracy with each sentence's correctness (for paired comparisons)."""
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.evaluation import evaluate
    from sherl_pipe.training import train

    from sherl_pipe.compare.job import warm_imports
    from sherl_pipe.compare.measure import peak_mib, reset_peak, rss_mib

    pipe = load_pipeline(pipe_file, overrides)
    torch.set_num_threads(pipe.train.threads)
    warm_imports(pipe)  # as compare measures: the peak above an idle process that imported the libraries
    idle = rss_mib()
    reset_peak()
    result = train(pipe, overwrite=True, log=lambda m: None)
    out = {"seconds": result.seconds, "steps": result.steps, "samples_per_s": result.samples_per_s,
           "peak_rss_mb": peak_rss_mb(), "peak_above_idle_mib": peak_mib() - idle, "threads": torch.get_num_threads()}
    info = json.loads((Path(pipe.train.run_dir) / "model.json").read_text())
    out["hyperparameters"] = {"lr_new": info["lr_new"], "lr_pretrained": info["lr_pretrained"],
                              "trainable_parameters": info["trainable_parameters"], **pipe.to_dict()["train"]}
    from sherl_pipe.cache import Cache

    if "test" in Cache(pipe.extract.cache).splits:  # data.test, or data.source split three ways
        ev = evaluate(pipe.train.run_dir, "test", "last")
        out["test_accuracy"] = ev["accuracy"]
        with open(Path(pipe.train.run_dir) / "predictions_test_last.csv", newline="") as f:
            out["correct"] = [int(r["label"] == r["gold"]) for r in csv.DictReader(f)]
    return out


def extract_job(pipe_file: str) -> dict:
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    pipe = load_pipeline(pipe_file)
    torch.set_num_threads(pipe.extract.threads)
    s = extract(pipe, log=lambda m: None)
    return {"samples": s.samples, "seconds": s.seconds}


def seed_and_row_interval(a: list[list[int]], b: list[list[int]]):
    """(difference, low, high): the 95% interval of mean-accuracy(a) - mean-accuracy(b) over runs,
    A and B each run's per-sentence correctness, covering seed noise and test sentences alike
    (sherl_pipe.compare.interval; it resampled sentences only, with each side's runs held fixed,
    until issue 30); low and high are NaN with one run on a side."""
    import numpy as np

    from sherl_pipe.compare.interval import difference_interval

    ones = np.ones(len(a[0]), dtype=np.int64)
    iv = difference_interval([np.asarray(r) for r in b], [np.asarray(r) for r in a], ones,
                             lambda pred, gold: float(np.mean(pred == gold)))
    diff = float(np.mean(np.asarray(a, dtype=float)) - np.mean(np.asarray(b, dtype=float)))
    return (diff, float("nan"), float("nan")) if iv is None else (iv.difference, iv.low, iv.high)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def train_runs(job, pipe: Path, work: Path, name: str, seeds: list[int], extra: list[str]) -> list[dict]:
    return [job(f"{name}-{seed}", ["--job", "train", "--pipe", str(pipe), "--set", f"train.seed={seed}",
                                   "--set", f"train.run_dir={work / 'runs' / f'{name}-{seed}'}", *extra])
            for seed in seeds]


def accuracy_line(label: str, runs: list[dict], base: list[dict] | None, timed: str = "epoch") -> dict:
    """Test accuracy (mean +- sd over runs), training time (TIMED names what it covers), and the
    difference against BASE's runs with its 95% interval (seeds and test sentences)."""
    acc = [r["test_accuracy"] for r in runs]
    sec = [r["seconds"] for r in runs]
    m, sd = mean_sd(acc)
    line = (f"  {label:<22} accuracy {100 * m:.2f} +- {100 * sd:.2f} {[round(100 * a, 2) for a in acc]}; "
            f"{timed} {statistics.median(sec):.1f} s [{min(sec):.1f}, {max(sec):.1f}]")
    out = {"acc": round(m, 4), "acc_sd": round(sd, 4), "train_s": round(statistics.median(sec), 1)}
    if base is not None:
        diff, lo, hi = seed_and_row_interval([r["correct"] for r in runs], [r["correct"] for r in base])
        if lo == lo:  # not NaN: two runs or more on each side
            line += f"; {100 * diff:+.2f} points, 95% interval [{100 * lo:+.2f}, {100 * hi:+.2f}]"
            out.update(delta=round(100 * diff, 2), ci95=[round(100 * lo, 2), round(100 * hi, 2)])
        else:
            line += f"; {100 * diff:+.2f} points (no interval: one run on a side)"
            out.update(delta=round(100 * diff, 2), ci95=None)
    print(line)
    return out
