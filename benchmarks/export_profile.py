"""Where an export's time goes against predict's: the MiniLM SHERL run of benchmarks/serve.py (trained
there first if missing) exported afresh by this checkout, SST-2's 872 test sentences by length in
batches of 32, at 1 and 2 threads. For each engine its wall time (median of 3 rounds, the engines
in turn) and, in one more profiled round, its time per op type: ONNX Runtime's profiler (kernel
time per node, summed by op type) on model.onnx, and torch's profiler (self CPU time per aten op)
on predict. A third engine shows what ONNX Runtime's transformer optimizer (onnxruntime.transformers:
attention, GELU, LayerNorm fusion for BERT-like graphs) adds to model.onnx: which fusions it found,
and its wall time.

    python benchmarks/export_profile.py         # a few minutes (serve.py's run first: about 5 more)

Last line: one JSON object, per thread count: each engine's samples/s, onnx_over_predict,
fused_over_onnx, the fusions found, and each profile's top op types with their share of the time.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, cpu_name, load_avg  # noqa: E402
from serve import in_turns, onnx_runner, prepare, sentences  # noqa: E402

TOP = 8


def batches(texts: list[str], size: int = 32) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def ort_profile(folder: Path, threads: int, work: list[list[str]], scratch: Path) -> dict:
    """Kernel time per op type over WORK, as shares of the total (the warm-up batch left out)."""
    import onnxruntime as ort

    from sherl_pipe.serve import OnnxModel

    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(scratch / "ort")
    start = time.perf_counter()  # the profiler's clock starts with the session
    model = OnnxModel(folder, threads, "model.onnx", options)
    model.outputs(work[0], None)
    warm_us = 1e6 * (time.perf_counter() - start)
    for b in work:
        model.outputs(b, None)
    events = json.loads(Path(model.session.end_profiling()).read_text())
    by = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm_us:
            by[e["args"]["op_name"]] += e["dur"]
    return shares(by)


def torch_profile(predictor, work: list[list[str]]) -> dict:
    from torch.profiler import profile

    with profile() as prof:
        for b in work:
            predictor.outputs(b, batch_size=len(b))
    by = collections.Counter({e.key: e.self_cpu_time_total for e in prof.key_averages()})
    return shares(by)


def shares(by: collections.Counter) -> dict:
    total = sum(by.values()) or 1
    return {k: round(v / total, 3) for k, v in by.most_common(TOP)}


def fused(folder: Path, hidden: int, heads: int) -> dict:
    """FOLDER's model.onnx through ONNX Runtime's transformer optimizer (BERT rules) into
    fused.onnx beside it: the fusions it found."""
    from onnxruntime.transformers.optimizer import optimize_model

    from sherl_pipe.export import libraries_quiet

    with libraries_quiet():
        model = optimize_model(str(folder / "model.onnx"), model_type="bert", num_heads=heads, hidden_size=hidden,
                               opt_level=0)
        model.save_model_to_file(str(folder / "fused.onnx"))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def at_threads(threads: int, run: Path, folder: Path, work: list[list[str]], scratch: Path) -> dict:
    import torch

    from sherl_pipe.prediction import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.load(run)
    config = predictor.backbone.config
    fusions = fused(folder, config.hidden_size, config.num_attention_heads)
    engines = {"predict": lambda b: predictor.outputs(b, batch_size=len(b)).numpy(),
               "onnx": onnx_runner(folder, "model.onnx", threads),
               "fused": onnx_runner(folder, "fused.onnx", threads)}
    for fn in engines.values():
        fn(work[0])  # warm up
    rates, _ = in_turns(engines, [t for b in work for t in b])
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"samples_per_s": {k: round(v, 1) for k, v in med.items()},
           "onnx_over_predict": round(med["onnx"] / med["predict"], 3),
           "fused_over_onnx": round(med["fused"] / med["onnx"], 3), "fusions": fusions,
           "onnx_profile": ort_profile(folder, threads, work, scratch),
           "predict_profile": torch_profile(predictor, work)}
    print(f"{threads} thread(s): samples/s " + ", ".join(f"{k} {v:.1f} [{min(rates[k]):.1f}, {max(rates[k]):.1f}]"
                                                        for k, v in med.items()), flush=True)
    print(f"  transformer optimizer's fusions: {fusions or 'none'}")
    for name in ("onnx_profile", "predict_profile"):
        print(f"  {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in out[name].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/serve"), help="serve.py's folder")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    args = ap.parse_args()
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    print(f"{cpu_name()}; {load_avg()}", flush=True)
    args.threads, threads = max(args.threads), args.threads  # serve.py's prepare trains at the most threads
    run, _ = prepare(args)
    texts, _ = sentences(args.data)
    work = batches(sorted(texts, key=len))  # as predict orders them
    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        from sherl_pipe.export import export

        folder = export(run, Path(scratch) / "export", log=lambda m: None)  # by this checkout's code, every run
        for n in threads:
            out[str(n)] = at_threads(n, run, folder, work, Path(scratch))
    print(load_avg())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
