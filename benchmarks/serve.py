"""What an export and the server deliver: a MiniLM SHERL run (SST-2, 4,000 training rows, the
defaults) exported to ONNX (fp32 and int8), on SST-2's 872 test sentences, 2 threads.

(a) ONNX Runtime fp32 samples/s over `predict`'s (the run folder's Predictor), batch 32, the
    tokenizer included on both sides, the sentences ordered by length for both (predict orders its
    batches so itself); (b) int8 over fp32 samples/s, and int8's test accuracy
    against fp32's; each timed in 3 rounds back to back (the order turned each round): medians
    with [min, max]. (c) `sherl-pipe serve` on the export (a process of its own, 2 threads), on
    model.onnx and then with --int8 on model.int8.onnx, with 1, 8 and 32 concurrent clients, each
    sending one sentence a request until the 872 are answered: requests/s, p50 and p99 latency
    (medians over 3 rounds), and the batching gain (8 clients' requests/s over one client's).

    python benchmarks/serve.py              # about 10 minutes on 2 CPU cores (most of it training)

Last line: one JSON object with `onnx_over_predict`, `int8_over_fp32`, `int8_accuracy_delta`
(points) and, under `server` (fp32) and `server_int8`, per concurrency `rps`, `p50_ms` and `p99_ms`, and
`batching_gain`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, load_avg  # noqa: E402

ROUNDS = 3


def prepare(args) -> tuple[Path, Path]:
    """The run (trained once) and its export (fp32 and int8), reused by a rerun."""
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.evaluation import evaluate
    from sherl_pipe.export import export
    from sherl_pipe.extraction import extract
    from sherl_pipe.training import train

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pipe = work / "pipeline.toml"
    pipe.write_text(f'[data]\ntrain = "{args.data / "train.tsv"}"\ntest = "{args.data / "test.tsv"}"\n'
                    f'text_column = "sentence"\nlimit = {args.rows + 500}\nvalidation_size = 500\n'
                    f'[extract]\ncache = "{work / "cache"}"\nthreads = {args.threads}\n'
                    f'[train]\nrun_dir = "{work / "run"}"\nthreads = {args.threads}\n')
    pipeline = load_pipeline(str(pipe))
    run, folder = work / "run", work / "export"
    if not (run / "summary.json").is_file():
        extract(pipeline, log=lambda m: None)
        train(pipeline, overwrite=True, log=lambda m: None)
        evaluate(run, "test")
    if not folder.exists():
        export(run, folder, quantize="int8", log=print)
    return run, folder


def sentences(data: Path) -> tuple[list[str], np.ndarray]:
    with open(data / "test.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], np.array([int(r["label"]) for r in rows])


def onnx_runner(folder: Path, name: str, threads: int):
    """The export's NAME as the server runs it (its tokenizer, labels.json's max_length)."""
    from sherl_pipe.serve import OnnxModel

    model = OnnxModel(folder, threads, name)
    return lambda texts: model.outputs(texts, None)


def timed(fn, texts: list[str], batch: int) -> tuple[float, np.ndarray]:
    """samples/s over TEXTS in batches of BATCH (in the order given), and the outputs."""
    t = time.perf_counter()
    out = np.concatenate([fn(texts[i:i + batch]) for i in range(0, len(texts), batch)])
    return len(texts) / (time.perf_counter() - t), out


def in_turns(runners: dict, texts: list[str], batch: int = 32) -> tuple[dict[str, list[float]], dict]:
    """Each runner's samples/s over TEXTS in batches of BATCH, ROUNDS rounds back to back, the order
    turned each round; and each one's outputs."""
    rates: dict[str, list[float]] = {k: [] for k in runners}
    outs = {}
    for r in range(ROUNDS):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            rate, outs[name] = timed(runners[name], texts, batch)
            rates[name].append(rate)
    return rates, outs


def throughput(run: Path, folder: Path, texts: list[str], gold: np.ndarray, args) -> dict:
    import torch

    from sherl_pipe.prediction import Predictor

    torch.set_num_threads(args.threads)
    predictor = Predictor.load(run)
    runners = {"predict": lambda xs: predictor.outputs(xs, batch_size=len(xs)).numpy(),
               "fp32": onnx_runner(folder, "model.onnx", args.threads),
               "int8": onnx_runner(folder, "model.int8.onnx", args.threads)}
    for fn in runners.values():
        fn(texts[:32])  # warm up
    rates, outs = in_turns(runners, texts)
    acc = {k: float((v.argmax(1) == gold).mean()) for k, v in outs.items()}
    ratio = lambda a, b: [x / y for x, y in zip(rates[a], rates[b])]  # noqa: E731
    for name in runners:
        print(f"  {name:<8} {statistics.median(rates[name]):7.1f} samples/s [{min(rates[name]):.1f}, "
              f"{max(rates[name]):.1f}], test accuracy {100 * acc[name]:.2f}")
    return {"rates": rates, "accuracy": acc, "onnx_over_predict": ratio("fp32", "predict"),
            "int8_over_fp32": ratio("int8", "fp32")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, texts: list[str], clients: int) -> tuple[float, list[float]]:
    import httpx

    queue = list(enumerate(texts))
    latencies: list[float] = []

    async def client(http):
        while queue:
            _, text = queue.pop()
            t = time.perf_counter()
            r = await http.post(f"{url}/predict", json={"texts": [text]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        t = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return len(texts) / (time.perf_counter() - t), latencies


def server_figures(folder: Path, texts: list[str], args, int8: bool = False) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sherl_pipe", "serve", str(folder), "--port", str(port),
                             "--threads", str(args.threads), *(["--int8"] if int8 else [])],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        asyncio.run(load(url, texts[:64], 8))  # warm up
        out = {}
        for clients in args.clients:
            runs = [asyncio.run(load(url, texts, clients)) for _ in range(ROUNDS)]
            rps = [r for r, _ in runs]
            p50 = [1000 * float(np.percentile(lat, 50)) for _, lat in runs]
            p99 = [1000 * float(np.percentile(lat, 99)) for _, lat in runs]
            out[str(clients)] = {"rps": round(statistics.median(rps), 1), "rps_range": [round(min(rps), 1), round(max(rps), 1)],
                                 "p50_ms": round(statistics.median(p50), 1), "p99_ms": round(statistics.median(p99), 1)}
            print(f"  {clients:>2} client(s): {out[str(clients)]['rps']} requests/s [{min(rps):.1f}, {max(rps):.1f}], "
                  f"p50 {out[str(clients)]['p50_ms']} ms, p99 {out[str(clients)]['p99_ms']} ms", flush=True)
        if "1" in out and "8" in out:
            out["batching_gain"] = round(out["8"]["rps"] / out["1"]["rps"], 2)
            print(f"  batching gain (8 clients over 1): {out['batching_gain']}x", flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/serve"))
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    args = ap.parse_args()
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    print(load_avg(), flush=True)
    run, folder = prepare(args)
    texts, gold = sentences(args.data)
    # by length, as predict orders its batches itself: every engine then gets the same batches
    # (in file order a batch of 32 pads to its longest sentence, and the engines' padding would differ)
    order = np.argsort([len(t) for t in texts], kind="stable")
    texts, gold = [texts[i] for i in order], gold[order]
    print(f"SST-2 test sentences ({len(texts)}), batch 32, {args.threads} thread(s), {ROUNDS} rounds:")
    t = throughput(run, folder, texts, gold, args)
    print("sherl-pipe serve on the export (model.onnx), one sentence a request:")
    server = server_figures(folder, texts, args)
    print("sherl-pipe serve --int8 on the export (model.int8.onnx), one sentence a request:")
    server_int8 = server_figures(folder, texts, args, int8=True)
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    print(load_avg())
    print(json.dumps({"onnx_over_predict": med(t["onnx_over_predict"]),
                      "onnx_over_predict_range": [round(min(t["onnx_over_predict"]), 3), round(max(t["onnx_over_predict"]), 3)],
                      "int8_over_fp32": med(t["int8_over_fp32"]),
                      "int8_over_fp32_range": [round(min(t["int8_over_fp32"]), 3), round(max(t["int8_over_fp32"]), 3)],
                      "int8_accuracy_delta": round(100 * (t["accuracy"]["int8"] - t["accuracy"]["fp32"]), 2),
                      "accuracy": t["accuracy"], "server": server, "server_int8": server_int8}))


if __name__ == "__main__":
    main()
