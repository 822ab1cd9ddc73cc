"""Where a cached training step's time goes: one SST-2 epoch from the cache (all-MiniLM-L6-v2, k = 1,
frozen late layer, batch 32), timed piece by piece, eager against `train.compile = true`.

  read            waiting for the reader (chunk decompression runs in its thread; lossy codes are
                  decoded when a batch is handed out)
  consolidation   forward, and backward (its share of loss.backward(), cut by gradient hooks on
                  the consolidation's and the late layers' outputs)
  late            the late layer(s), forward and backward
  head            pooling, head and loss, forward and backward
  optimizer       gradient clipping, AdamW step, schedule step and zero_grad

Each variant runs in its own process, two epochs in a row: the first epoch includes the fixed costs
(first reader window, allocator warm-up, compilation), the second is the steady state. Variants take
turns for --repeats rounds (order reversed every other round); figures are medians [min, max].
The last line is one JSON object: `consolidation_over_late` (forward + backward, eager, steady
epoch), `compiled_over_eager` (steady epoch, paired within rounds) and the breakdown in seconds.
Everything runs in fp32, without autocast (train.precision = auto on the CPU).

    python benchmarks/step.py              # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, Jobs, add_job_args, extract_job, load_avg  # noqa: E402

PARTS = ["read", "consolidation_forward", "consolidation_backward", "late_forward", "late_backward",
         "head_forward", "head_backward", "optimizer"]
VARIANTS = {"eager": [], "compiled": ["train.compile=true"]}


def pipeline_text(args, cache: Path) -> str:
    return (f'[data]\ntrain = "{args.data / "train.tsv"}"\ntext_column = "sentence"\nlabel_column = "label"\n'
            f'limit = {args.rows}\n[extract]\ncache = "{cache}"\nthreads = {args.threads}\n'
            f'[train]\nlate_layers = 1\nthreads = {args.threads}\nbatch_size = 32\neval_split = ""\nlate_tuning = "frozen"\n')


def timed_epoch(s, spec, epoch: int) -> dict:
    """One epoch of the trainer's step, cut into PARTS by clocks and gradient hooks."""
    import torch

    from sherl_pipe.model import pool
    from sherl_pipe.training.inference import loss_fn

    model, clock = s.model, time.perf_counter
    model.train()
    spent, marks = dict.fromkeys(PARTS, 0.0), {}
    start = last = clock()
    for batch in s.train_src.iterate(s.sampler.batches(epoch)):
        t0 = clock()
        x = model.consolidate(batch.states, batch.mask)
        t1 = clock()
        h = model.late_route(x, batch.mask)
        t2 = clock()
        loss = loss_fn(spec, model.head(pool(h, batch.mask, spec.pooling, model.pooler)), batch.labels)
        t3 = clock()
        x.register_hook(lambda g: marks.__setitem__("late done", clock()))
        h.register_hook(lambda g: marks.__setitem__("head done", clock()))
        loss.backward()
        t4 = clock()
        if s.budget.grad_clip > 0:  # as the trainer's step does
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.budget.grad_clip)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        t5 = clock()
        for part, seconds in zip(PARTS, [t0 - last, t1 - t0, t4 - marks["late done"], t2 - t1,
                                         marks["late done"] - marks["head done"], t3 - t2,
                                         marks["head done"] - t3, t5 - t4]):
            spent[part] += seconds
        last = t5
    return {"epoch": last - start, **spent}


def job_profile(pipe_file: str, sets: list[str]) -> dict:
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.training.run import build_session, open_training_cache

    pipe = load_pipeline(pipe_file, sets)
    torch.set_num_threads(pipe.train.threads)
    torch.manual_seed(0)
    cache, spec, eval_split = open_training_cache(pipe)
    said: list[str] = []
    s = build_session(pipe, cache, spec, eval_split, "cpu", said.append)
    first, steady = timed_epoch(s, spec, 0), timed_epoch(s, spec, 1)
    return {"first": first, "steady": steady, "said": said}


def report(rounds: list[dict]) -> dict:
    med = statistics.median

    def spread(xs):
        return f"{med(xs):6.3f} s [{min(xs):.3f}, {max(xs):.3f}]"

    out: dict = {}
    for name in VARIANTS:
        steady = [r[name]["steady"] for r in rounds]
        print(f"\n{name}: steady epoch {spread([x['epoch'] for x in steady])}; first epoch "
              f"{spread([r[name]['first']['epoch'] for r in rounds])}")
        for part in PARTS:
            xs = [x[part] for x in steady]
            print(f"  {part:<24} {spread(xs)}  {100 * med(xs) / med([x['epoch'] for x in steady]):5.1f}%")
        said = {m for r in rounds for m in r[name]["said"]}
        for m in said:
            print(f"  said: {m}")
        out[name] = {part: round(med([x[part] for x in steady]), 4) for part in ["epoch"] + PARTS}
        out[name]["first_epoch"] = round(med([r[name]["first"]["epoch"] for r in rounds]), 4)

    def cons_over_late(x):
        return ((x["consolidation_forward"] + x["consolidation_backward"])
                / (x["late_forward"] + x["late_backward"]))

    ratios = [cons_over_late(r["eager"]["steady"]) for r in rounds]
    compiled = [r["compiled"]["steady"]["epoch"] / r["eager"]["steady"]["epoch"] for r in rounds]
    print(f"\nconsolidation_over_late (forward + backward, eager) {med(ratios):.3f} [{min(ratios):.3f}, "
          f"{max(ratios):.3f}]")
    print(f"compiled_over_eager (steady epoch) {med(compiled):.3f} [{min(compiled):.3f}, {max(compiled):.3f}]")
    return {"consolidation_over_late": round(med(ratios), 4), "compiled_over_eager": round(med(compiled), 4),
            "breakdown_s": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/step"))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:
        out = extract_job(args.pipe) if args.job == "extract" else job_profile(args.pipe, args.set)
        print(json.dumps(out))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    args.work.mkdir(parents=True, exist_ok=True)
    job = Jobs(__file__, args.work / "results.jsonl")
    pipe = args.work / "step.toml"
    pipe.write_text(pipeline_text(args, args.work / "cache"))
    job("extract", ["--job", "extract", "--pipe", str(pipe)])
    print(f"before: {load_avg()}")
    rounds = []
    for r in range(args.repeats):
        order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        rounds.append({name: job(f"{name}-r{r}", ["--job", "profile", "--pipe", str(pipe)]
                                 + [x for s in VARIANTS[name] for x in ("--set", s)]) for name in order})
    print(f"after: {load_avg()}")
    print(f"\none epoch of {args.rows} SST-2 rows from the cache, batch 32, {args.threads} threads, "
          f"{args.repeats} rounds")
    print(json.dumps(report(rounds)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
