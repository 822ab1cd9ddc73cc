"""Stage one at scale, on SST-2 (4,000 rows of train.tsv, test.tsv; all-MiniLM-L6-v2; float16
storage), each measurement in a fresh process, alternatives back to back, --repeats rounds
(medians with [min, max]):

  workers   (a) extraction with 2 workers (1 torch thread each) against 1 worker (1 thread)
  s3        (b) one training epoch (frozen late layer) reading the cache from a loopback S3 server
            (moto) against the same cache in a local folder; (c) extraction written to S3
            against written locally
  precision (d) bf16 against fp32 extraction (2 threads, in-process): the block loop's time (the
            per-sample work; model load and tokenizing are the same in both)
  flops     (e) the early layers' achieved throughput as a share of this machine's matmul peak in
            each precision: real tokens/s x the early layers' FLOPs per token (2 x layers x
            (4 D^2 + 2 D I): the projections and the feed-forward; attention's T-dependent products
            left out) / the GFLOP/s of a 4096^3 matmul of that precision, timed in the same run
  accuracy  the tiers' error of a bf16 extraction against fp32 (max and mean relative, per tier)
            and SST-2 test accuracy of SHERL (defaults) trained from each cache, 3 seeds, a 95%
            interval covering seeds and test sentences

    python benchmarks/scale.py                       # every part (about an hour on 2 cores)
    python benchmarks/scale.py --parts precision,flops --repeats 3

Last line: one JSON object with the parts' figures: extract_two_over_one_worker,
epoch_s3_over_local, extract_s3_over_local, extract_bf16_over_fp32, extract_flop_share_fp32,
extract_flop_share_bf16, bf16_acc_delta and the rest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA, Jobs, accuracy_line, add_backbone_arg, add_job_args, backbone_section,  # noqa: E402
                    backbone_tag, cpu_name, load_avg, train_job, train_runs)

PARTS = ("workers", "s3", "precision", "flops", "accuracy")


def pipeline_text(args, cache: str, extra: str = "") -> str:
    return (f'[data]\ntrain = "{args.data / "train.tsv"}"\ntest = "{args.data / "test.tsv"}"\n'
            f'text_column = "sentence"\nlimit = {args.rows}\n{backbone_section(args.backbone)}'
            f'[extract]\ncache = "{cache}"\nthreads = 2\n{extra}'
            f'[train]\nthreads = 2\neval_split = ""\n')


def extract_timed(pipe_file: str, sets: list[str]) -> dict:
    """An extraction into a fresh cache (removed first): its block loop's time and real tokens."""
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    pipe = load_pipeline(pipe_file, sets)
    torch.set_num_threads(pipe.extract.threads)
    if "://" not in pipe.extract.cache:
        shutil.rmtree(pipe.extract.cache, ignore_errors=True)
    t = time.perf_counter()
    s = extract(pipe, log=lambda m: None)
    return {"seconds": time.perf_counter() - t, "blocks_s": s.timings.get("blocks", s.seconds),
            "real_tokens": s.real_tokens, "samples": s.samples}


def matmul_peak(threads: int, precision: str, n: int = 4096, reps: int = 5) -> dict:
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return {"gflops": 2 * n**3 / best / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def tier_error(fp32_cache: str, bf16_cache: str) -> dict:
    """Per tier: max |bf16 - fp32| / max |fp32| and mean |bf16 - fp32| / mean |fp32| (train split)."""
    import numpy as np

    from sherl_pipe.cache import Cache

    a, b = Cache(fp32_cache), Cache(bf16_cache)
    out = {}
    for t in a.tiers:
        ref, got = a.read("train", f"h{t}").astype(np.float32), b.read("train", f"h{t}").astype(np.float32)
        diff = np.abs(got - ref)
        out[f"h{t}"] = {"max_rel": float(diff.max() / np.abs(ref).max()),
                        "mean_rel": float(diff.mean() / np.abs(ref).mean())}
    return out


def median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def ratios(job, pipe: Path, name: str, a: list[str], b: list[str], repeats: int, key: str = "blocks_s",
           kind: str = "extract") -> list:
    """A over B, back to back, the order reversed every other round ({r} in a setting: the round)."""
    return [pair["a"][key] / pair["b"][key] for pair in pairs(job, pipe, name, a, b, repeats, kind)]


def pairs(job, pipe: Path, name: str, a: list[str], b: list[str], repeats: int, kind: str = "extract") -> list:
    out = []
    for r in range(repeats):
        pair = {}
        for side, sets in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
            pair[side] = job(f"{name}-{side}-{r}", ["--job", kind, "--pipe", str(pipe),
                                                     *[x for s in sets for x in ("--set", s.format(r=r))]])
        out.append(pair)
    return out


def part_workers(job, pipe: Path, args, work: Path) -> dict:
    """(a): the whole extraction (2 workers: the cluster's start and each worker's model load
    included) and its block loop, each against one process with one torch thread."""
    got = pairs(job, pipe, "workers", [f"extract.cache={work / 'c-w2'}", "extract.workers=2", "extract.threads=1"],
                [f"extract.cache={work / 'c-w1'}", "extract.threads=1"], args.repeats)
    whole = [p["a"]["seconds"] / p["b"]["seconds"] for p in got]
    loop = [p["a"]["blocks_s"] / p["b"]["blocks_s"] for p in got]
    print(f"  (a) 2 workers / 1 worker (1 thread each): whole extraction {median_range(whole)}, block loop "
          f"{median_range(loop)} (1 worker's loop {statistics.median(p['b']['blocks_s'] for p in got):.1f} s)", flush=True)
    return {"extract_two_over_one_worker": round(statistics.median(whole), 4),
            "extract_two_over_one_worker_blocks": round(statistics.median(loop), 4)}


def start_s3():
    """moto's S3 server on a free loopback port with a bucket, fake credentials in the environment
    (the jobs inherit them); (server, endpoint URL)."""
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, url


def part_s3(job, pipe: Path, args, work: Path) -> dict:
    """(c) extraction written to S3 against a local folder (a fresh prefix each round), then (b)
    one epoch of training (k = 1, frozen) from the S3 cache against the local one."""
    server, url = start_s3()
    served = ServerCPU(job)  # the server runs in this process: its CPU seconds are this process's
    try:
        opt = f"extract.storage_options.endpoint_url={url}"
        ex = pairs(served, pipe, "s3-extract", ["extract.cache=s3://bench/c-{r}", opt],
                   [f"extract.cache={work / 'c-local'}"], args.repeats)
        write = [p["a"]["blocks_s"] / p["b"]["blocks_s"] for p in ex]
        print(f"  (c) extraction to S3 / local (block loop, 2 threads): {median_range(write)}; {served.says(ex)}",
              flush=True)
        run = ["train.late_layers=1", "train.late_tuning=frozen", "train.epochs=1", f"train.run_dir={work / 'run'}"]
        ep = pairs(served, pipe, "s3-epoch", ["extract.cache=s3://bench/c-0", opt, *run],
                   [f"extract.cache={work / 'c-local'}", *run], args.repeats, kind="epoch")
        epoch = [p["a"]["seconds"] / p["b"]["seconds"] for p in ep]
        print(f"  (b) one epoch from S3 / local: {median_range(epoch)}; {served.says(ep)}", flush=True)
    finally:
        server.stop()
    return {"extract_s3_over_local": round(statistics.median(write), 4),
            "epoch_s3_over_local": round(statistics.median(epoch), 4),
            "s3_server_cpu_s": {"extract": served.median(ex), "epoch": served.median(ep)}}


class ServerCPU:
    """Jobs, each result with `server_cpu_s`: the CPU seconds this process (the S3 server's
    threads; the benchmark itself only waits) spent while the job ran. On 2 cores, a job using both
    loses about that much time to the server."""

    def __init__(self, job):
        self.job = job

    def __call__(self, key: str, argv: list[str]) -> dict:
        ran, t = key not in self.job.results, time.process_time()
        out = self.job(key, argv)
        if ran:  # a result read back from an earlier run has no such figure
            out["server_cpu_s"] = round(time.process_time() - t, 3)
        return out

    def median(self, got: list) -> float:
        cpu = [p["a"]["server_cpu_s"] for p in got if "server_cpu_s" in p["a"]]
        return round(statistics.median(cpu), 3) if cpu else float("nan")

    def says(self, got: list) -> str:
        return (f"the S3 server's own CPU time per S3 run {self.median(got):.2f} s (median; its process's "
                f"CPU time while the run lasted)")


def epoch_job(pipe_file: str, sets: list[str]) -> dict:
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.training import train

    pipe = load_pipeline(pipe_file, sets)
    torch.set_num_threads(pipe.train.threads)
    result = train(pipe, overwrite=True, log=lambda m: None)
    return {"seconds": result.seconds, "steps": result.steps, "samples_per_s": result.samples_per_s}


def part_precision(job, pipe: Path, args, work: Path) -> dict:
    got = ratios(job, pipe, "prec", [f"extract.cache={work / 'c-bf16'}", "extract.precision=bf16"],
                 [f"extract.cache={work / 'c-fp32'}"], args.repeats)
    print(f"  (d) bf16 / fp32 extraction (block loop, 2 threads): {median_range(got)}", flush=True)
    return {"extract_bf16_over_fp32": round(statistics.median(got), 4)}


def part_flops(job, pipe: Path, args, work: Path) -> dict:
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.methods.spec import config_from_manifest

    out = {}
    for p in ("fp32", "bf16"):
        peak = job(f"peak-{p}", ["--job", "peak", "--pipe", str(pipe), "--set", p])["gflops"]
        run = job(f"prec-{'a' if p == 'bf16' else 'b'}-0", [])  # the precision part's first round
        from sherl_pipe.cache import Cache

        cache = Cache(load_pipeline(str(pipe), [f"extract.cache={work / f'c-{p}'}"]).extract.cache)
        config = config_from_manifest(cache.manifest)
        layers = cache.manifest["cut"]
        flops = 2 * layers * (4 * config.hidden_size ** 2 + 2 * config.hidden_size * config.intermediate_size)
        achieved = run["real_tokens"] / run["blocks_s"] * flops / 1e9
        out[f"extract_flop_share_{p}"] = round(achieved / peak, 4)
        print(f"  (e) {p}: {run['real_tokens'] / run['blocks_s']:.0f} real tokens/s x {flops / 1e6:.1f} MFLOP = "
              f"{achieved:.0f} GFLOP/s of a {peak:.0f} GFLOP/s matmul peak: {achieved / peak:.3f}", flush=True)
        sets = [f"extract.cache={work / f'c-fwd-{p}'}", f"extract.precision={p}"]
        fwd = job(f"forward-{p}", ["--job", "forward", "--pipe", str(pipe), *[x for s in sets for x in ("--set", s)]])
        share = run["blocks_s"] and fwd["forward_s"] / run["blocks_s"]
        out[f"forward_flop_share_{p}"] = round(run["real_tokens"] * flops / fwd["forward_s"] / 1e9 / peak, 4)
        print(f"      the forward passes alone took {fwd['forward_s']:.2f} s of the block loop's {run['blocks_s']:.2f} s "
              f"({share:.2f}; the rest: encoding and writing the chunks, in a second thread on the same 2 cores): "
              f"{out[f'forward_flop_share_{p}']:.3f} of the peak", flush=True)
    return out


def part_accuracy(job, pipe: Path, args, work: Path) -> dict:
    errors = job("tier-error", ["--job", "tier-error", "--pipe", str(pipe), "--set", str(work / "c-fp32"),
                                "--set", str(work / "c-bf16")])
    for t, e in errors.items():
        if t.startswith("h"):
            print(f"  bf16 tier {t}: max relative error {e['max_rel']:.2e}, mean {e['mean_rel']:.2e}")
    seeds = list(range(args.seeds))
    runs = {p: train_runs(job, pipe, work, f"sherl-{p}", seeds,
                          ["--set", f"extract.cache={work / f'c-{p}'}", "--set", "train.late_layers=2"])
            for p in ("fp32", "bf16")}
    print("  SHERL (defaults) from each cache, SST-2 test accuracy:")
    out = {p: accuracy_line(p, runs[p], None if p == "fp32" else runs["fp32"], timed="train") for p in runs}
    return {"bf16_acc_delta": out["bf16"]["delta"], "bf16_acc_ci95": out["bf16"]["ci95"],
            "tier_error": {t: e for t, e in errors.items() if t.startswith("h")}}


def forward_job(pipe_file: str, sets: list[str]) -> dict:
    """The extraction's forward passes alone (compute_block over every block: the early layers and
    the conversion to the stored dtype; no encoding or writing), in the pipeline's precision."""
    import torch

    from sherl_pipe.blocks import compute_block
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import block_job, make_task, prepare

    pipe = load_pipeline(pipe_file, sets)
    torch.set_num_threads(pipe.extract.threads)
    shutil.rmtree(pipe.extract.cache, ignore_errors=True)
    plan = prepare(pipe, {}, overwrite=False, log=lambda m: None)
    job, size = block_job(pipe, plan), pipe.extract.chunk_size
    blocks = [(n, b) for n, split in plan.dataset.splits.items() for b in range(-(-len(split) // size))]
    with torch.inference_mode():
        compute_block(plan.backbone, job, make_task(plan, *blocks[0], size), plan.device)  # warm up
        t = time.perf_counter()
        for name, b in blocks:
            compute_block(plan.backbone, job, make_task(plan, name, b, size), plan.device)
    return {"forward_s": time.perf_counter() - t}


def run_job(args) -> dict:
    if args.job == "extract":
        return extract_timed(args.pipe, args.set)
    if args.job == "peak":
        return matmul_peak(2, args.set[0])
    if args.job == "forward":
        return forward_job(args.pipe, args.set)
    if args.job == "epoch":
        return epoch_job(args.pipe, args.set)
    if args.job == "tier-error":
        return tier_error(*args.set)
    return train_job(args.pipe, args.set)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/scale"))
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parts", default=",".join(PARTS))
    add_backbone_arg(ap)
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:
        print(json.dumps(run_job(args)))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    work = args.work.absolute() / f"rows{args.rows}{backbone_tag(args.backbone)}"
    work.mkdir(parents=True, exist_ok=True)
    job = Jobs(__file__, work / "results.jsonl")
    pipe = work / "pipeline.toml"
    pipe.write_text(pipeline_text(args, str(work / "c-fp32")))
    print(f"{cpu_name()}; {load_avg()}", flush=True)
    parts = args.parts.split(",")
    if "flops" in parts or "accuracy" in parts:
        parts = ["precision", *[p for p in parts if p != "precision"]]  # they read its caches and times
    out: dict = {}
    for part in PARTS:
        if part in parts and part in PART_FUNCTIONS:
            out.update(PART_FUNCTIONS[part](job, pipe, args, work))
    print(load_avg())
    print(json.dumps(out))


PART_FUNCTIONS = {"workers": part_workers, "s3": part_s3, "precision": part_precision, "flops": part_flops, "accuracy": part_accuracy}

if __name__ == "__main__":
    main()
