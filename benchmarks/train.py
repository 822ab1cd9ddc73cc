"""Stage two on SST-2 with all-MiniLM-L6-v2, k = 1: speed, memory and accuracy, each method in its
own subprocess.

  speed     one training epoch from the cache against one live epoch (early layers run under
            inference_mode on the same tokenized batches, same threads, no evaluation), for `frozen`
            and `full` late tuning; and one cached epoch against the same batches preloaded in memory.
            The methods take turns for --repeats rounds (default 4, order reversed every other
            round); each ratio is the median of the per-round ratios of consecutive runs, since
            this shared machine's speed drifts by tens of percent.
  memory    each process's peak RSS; and the training state (weights, gradients, AdamW state, saved
            activations) at batch 32 x 64 tokens, for SHERL from the cache, live SHERL and full
            fine-tuning.
  accuracy  test.tsv (the 872-sentence GLUE validation set): SHERL from the cache (3 seeds) and full
            fine-tuning (2 seeds) on train.tsv with the same fixed epoch budget and the last epoch's
            weights (no selection on dev.tsv, whose phrases mostly occur inside train.tsv), mean +- sd,
            and a 95% interval (seeds and test rows) of the difference; plus one seed of each other late
            tuning mode.

Results append to a JSONL file as jobs finish, so an interrupted benchmark resumes where it stopped.
`--quick` runs a small subset (2,000 speed rows, 4,000 training rows, 1 epoch, one seed each) in
under 10 minutes. The last line is one JSON object.

    python benchmarks/train.py            # the full benchmark (about 65 minutes on 2 CPU cores; more when the machine is slow)
    python benchmarks/train.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA, Jobs, add_backbone_arg, add_job_args, backbone_section, backbone_tag,  # noqa: E402
                    extract_job, mean_sd, seed_and_row_interval, train_job)

STATE_BATCH, STATE_LEN = 32, 64


def pipeline_text(args, cache: Path, train_rows: int, with_test: bool = True) -> str:
    limit = f"limit = {train_rows}\n" if train_rows else ""
    test = f'test = "{args.data / "test.tsv"}"\n' if with_test else ""
    return (f'[data]\ntrain = "{args.data / "train.tsv"}"\n{test}'
            f'text_column = "sentence"\nlabel_column = "label"\n{limit}{backbone_section(args.backbone)}'
            f'[extract]\ncache = "{cache}"\nthreads = {args.threads}\n'
            f'[train]\nlate_layers = 1\nthreads = {args.threads}\nbatch_size = 32\neval_split = ""\n')


def job_state(pipe_file: str, mode: str) -> dict:
    """Training-state bytes at STATE_BATCH x STATE_LEN: weights, gradients, AdamW moments, saved activations."""
    import torch

    from sherl_pipe.cache import Cache
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.training.batches import Batch
    from sherl_pipe.training.inference import loss_fn
    from sherl_pipe.training.setup import build_model, make_spec

    pipe = load_pipeline(pipe_file, [f"train.mode={mode}", "train.late_tuning=frozen"])
    manifest = Cache(pipe.extract.cache).manifest
    spec = make_spec(pipe.train, manifest)
    model, live = build_model(spec, pipe.backbone.source, manifest, "cpu")
    model.train()
    d = manifest["backbone"]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (STATE_BATCH, STATE_LEN), generator=g)
    mask = torch.ones(STATE_BATCH, STATE_LEN, dtype=torch.long)
    tiers = spec.plugin.reads(spec)
    batch = Batch(None, {t: torch.randn(STATE_BATCH, STATE_LEN, d, generator=g) for t in tiers}, mask,
                  torch.zeros(STATE_BATCH, dtype=torch.long), ids, None)
    if live is not None:
        batch = live(batch)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(spec, model.forward_batch(batch), batch.labels)
    loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    early = 0
    if live is not None:
        early = sum(p.numel() * p.element_size() for p in live.backbone.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"mode": mode, "batch": STATE_BATCH, "length": STATE_LEN,
            "weights_mb": (weights + early) / 2**20, "grads_mb": trainable / 2**20,
            "adam_mb": 2 * trainable / 2**20, "activations_mb": sum(saved.values()) / 2**20}


# --- driver ------------------------------------------------------------------------------------------

def accuracy_jobs(job, acc_pipe, work, epochs, sherl_seeds, ft_seeds, other_modes):
    acc: dict[str, list[dict]] = {"sherl": [], "fullft": []}
    for seed in sherl_seeds:
        acc["sherl"].append(job(f"acc-sherl-frozen-{seed}", [
            "--job", "train", "--pipe", str(acc_pipe), "--set", f"train.epochs={epochs}", "--set", f"train.seed={seed}",
            "--set", "train.late_tuning=frozen", "--set", f"train.run_dir={work / 'runs' / f'sherl-{seed}'}"]))
    others = {m: job(f"acc-sherl-{m}-0", [
        "--job", "train", "--pipe", str(acc_pipe), "--set", f"train.epochs={epochs}", "--set", "train.seed=0",
        "--set", f"train.late_tuning={m}", "--set", f"train.run_dir={work / 'runs' / f'sherl-{m}'}"])
        for m in other_modes}
    for seed in ft_seeds:  # the slow ones last (17 to 27 minutes an epoch of train.tsv on 2 CPU cores)
        acc["fullft"].append(job(f"acc-fullft-{seed}", [
            "--job", "train", "--pipe", str(acc_pipe), "--set", f"train.epochs={epochs}", "--set", f"train.seed={seed}",
            "--set", "train.mode=full-finetune", "--set", f"train.run_dir={work / 'runs' / f'fullft-{seed}'}"]))

    return acc, others


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/train"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="fixed epoch budget of every accuracy run")
    ap.add_argument("--repeats", type=int, default=4, help="rounds of the speed comparison (ratios: median)")
    ap.add_argument("--parts", default="speed,state,accuracy", help="comma-separated parts to run and report")
    add_backbone_arg(ap)
    add_job_args(ap)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.job:  # inside a job process
        out = {"extract": lambda: extract_job(args.pipe), "train": lambda: train_job(args.pipe, args.set),
               "state": lambda: job_state(args.pipe, args.mode)}[args.job]()
        print(json.dumps(out))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")

    work = args.work / (("quick" if args.quick else "full") + backbone_tag(args.backbone))
    work.mkdir(parents=True, exist_ok=True)
    job = Jobs(__file__, work / "results.jsonl")
    results = job.results
    speed_rows, acc_rows = (2000, 4000) if args.quick else (8000, 0)
    epochs = 1 if args.quick else args.epochs
    sherl_seeds, ft_seeds = ([0], [0]) if args.quick else ([0, 1, 2], [0, 1])
    other_modes = [] if args.quick else ["full", "norm-bias", "lora"]

    speed_pipe, acc_pipe = work / "speed.toml", work / "accuracy.toml"
    # no test split: speed runs are not evaluated, and a pipeline must describe its cache exactly
    speed_pipe.write_text(pipeline_text(args, work / "cache-speed", speed_rows, with_test=False))
    acc_pipe.write_text(pipeline_text(args, work / "cache-accuracy", acc_rows))

    parts = set(args.parts.split(","))
    if "accuracy" in parts:  # the long part first: its figures do not depend on machine load
        job("extract-accuracy", ["--job", "extract", "--pipe", str(acc_pipe)])
        acc, others = accuracy_jobs(job, acc_pipe, work, epochs, sherl_seeds, ft_seeds, other_modes)
    if "speed" in parts or "state" in parts:
        job("extract-speed", ["--job", "extract", "--pipe", str(speed_pipe)])

    summary: dict = {"quick": args.quick}
    if "speed" in parts:
        summary.update(report_speed(*speed_jobs(job, speed_pipe, work, args.repeats), speed_rows, args.threads))
    if "state" in parts:
        state = {m: job(f"state-{m}", ["--job", "state", "--pipe", str(speed_pipe), "--mode", m])
                 for m in ("cached", "live", "full-finetune")}
        report_state(state)
    if "accuracy" in parts:
        summary.update(report_accuracy(acc, others, acc_rows, epochs, sherl_seeds, ft_seeds))
    print("\nhyperparameters of every run:")
    for key, x in results.items():
        if "hyperparameters" in x:
            h = x["hyperparameters"]
            print(f"  {key}: method {h['method']}, source {h['source']}, late_tuning {h['late_tuning']}, lr_new {h['lr_new']}, lr_pretrained "
                  f"{h['lr_pretrained']}, batch {h['batch_size']}, epochs {h['epochs']}, warmup {h['warmup_ratio']}, "
                  f"weight_decay {h['weight_decay']}, dropout {h['dropout']}, seed {h['seed']}, "
                  f"trainable {h['trainable_parameters']}")
    print(json.dumps(summary))


# Each ratio's two runs sit next to each other in a round (this order, reversed in odd rounds).
SPEED_METHODS = [
    ("memory-frozen", ["train.mode=cached", "train.late_tuning=frozen", "train.preload=true"]),
    ("cached-frozen", ["train.mode=cached", "train.late_tuning=frozen"]),
    ("live-frozen", ["train.mode=live", "train.late_tuning=frozen"]),
    ("cached-full", ["train.mode=cached", "train.late_tuning=full"]),
    ("live-full", ["train.mode=live", "train.late_tuning=full"]),
]
SPEED_RATIOS = {"cached_over_live_epoch_frozen": ("cached-frozen", "live-frozen"),
                "cached_over_live_epoch_full": ("cached-full", "live-full"),
                "cached_over_inmemory": ("cached-frozen", "memory-frozen")}


def speed_jobs(job, speed_pipe: Path, work: Path, repeats: int) -> tuple[list[dict], dict]:
    """One epoch each, evaluation off; the run folders are throwaway. The methods take turns,
    round after round, so that each ratio is taken between two consecutive runs, with the order
    reversed every other round so that a steady drift favours neither side: this machine's speed
    drifts by tens of percent over minutes. Full fine-tuning runs once (for its memory)."""
    def argv(name, sets):
        out = ["--job", "train", "--pipe", str(speed_pipe), "--set", "train.epochs=1",
               "--set", f"train.run_dir={work / 'runs' / ('speed-' + name)}"]
        for s in sets:
            out += ["--set", s]
        return out

    rounds = [{name: job(f"speed-{name}-r{r}", argv(name, sets))
               for name, sets in (SPEED_METHODS if r % 2 == 0 else SPEED_METHODS[::-1])}
              for r in range(repeats)]
    return rounds, job("speed-fullft", argv("fullft", ["train.mode=full-finetune"]))


def report_speed(rounds: list[dict], fullft: dict, rows: int, threads: int) -> dict:
    med = statistics.median
    print(f"\nspeed ({rows} SST-2 rows, one epoch, batch 32, {threads} threads; {len(rounds)} rounds, "
          f"methods in turn; median [min, max]):")
    for name, _ in SPEED_METHODS:
        sec = [r[name]["seconds"] for r in rounds]
        print(f"  {name:<14} {med(sec):7.2f} s [{min(sec):.2f}, {max(sec):.2f}]  "
              f"{rows / med(sec):8.1f} samples/s  peak RSS {max(r[name]['peak_rss_mb'] for r in rounds):.0f} MB, "
              f"above idle {med(r[name]['peak_above_idle_mib'] for r in rounds):.0f} MiB")
    print(f"  {'fullft':<14} {fullft['seconds']:7.2f} s (one run)  {fullft['samples_per_s']:8.1f} samples/s  "
          f"peak RSS {fullft['peak_rss_mb']:.0f} MB")
    out = {}
    for key, (a, b) in SPEED_RATIOS.items():
        ratios = [r[a]["seconds"] / r[b]["seconds"] for r in rounds]  # pair by pair, within a round
        out[key] = round(med(ratios), 4)
        print(f"  {key} {med(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    peak = lambda name: round(max(r[name]["peak_rss_mb"] for r in rounds), 1)  # noqa: E731
    return {**out, "cached_peak_mb": peak("cached-frozen"), "live_peak_mb": peak("live-frozen"),
            "full_ft_peak_mb": round(fullft["peak_rss_mb"], 1)}


def report_state(state: dict) -> None:
    print(f"\ntraining state at batch {STATE_BATCH} x {STATE_LEN} tokens (MB):")
    for m, s in state.items():
        total = s["weights_mb"] + s["grads_mb"] + s["adam_mb"] + s["activations_mb"]
        print(f"  {m:<14} weights {s['weights_mb']:7.1f}  grads {s['grads_mb']:6.1f}  adam {s['adam_mb']:6.1f}  "
              f"saved activations {s['activations_mb']:7.1f}  total {total:7.1f}")


def report_accuracy(acc: dict, others: dict, rows: int, epochs: int, sherl_seeds, ft_seeds) -> dict:
    sherl_acc = [x["test_accuracy"] for x in acc["sherl"]]
    ft_acc = [x["test_accuracy"] for x in acc["fullft"]]
    (sm, ss), (fm, fs) = mean_sd(sherl_acc), mean_sd(ft_acc)
    diff, lo, hi = seed_and_row_interval([x["correct"] for x in acc["sherl"]], [x["correct"] for x in acc["fullft"]])
    print(f"\naccuracy on test.tsv ({len(acc['sherl'][0]['correct'])} sentences; {rows or 'all'} training rows, "
          f"{epochs} epoch(s), last epoch's weights):")
    print(f"  SHERL (cache, frozen late layer) {100 * sm:.2f} +- {100 * ss:.2f} over seeds {sherl_seeds}: {sherl_acc}")
    print(f"  full fine-tuning                 {100 * fm:.2f} +- {100 * fs:.2f} over seeds {ft_seeds}: {ft_acc}")
    print(f"  difference {100 * diff:+.2f} points, 95% interval (seeds and test rows) [{100 * lo:+.2f}, {100 * hi:+.2f}]")
    for m, x in others.items():
        print(f"  SHERL late_tuning={m:<10} seed 0: {100 * x['test_accuracy']:.2f}")
    return {"sherl_cached_test_acc": round(sm, 4), "sherl_cached_test_acc_sd": round(ss, 4),
            "full_ft_test_acc": round(fm, 4), "full_ft_test_acc_sd": round(fs, 4),
            "diff_points": round(100 * diff, 2), "diff_ci95_points": [round(100 * lo, 2), round(100 * hi, 2)],
            **{f"sherl_{m.replace('-', '_')}_test_acc": round(x["test_accuracy"], 4) for m, x in others.items()}}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
