"""One compare trial, run as `python -m sherl_pipe.compare.job SPEC.json` in a fresh process (its
memory is its own): train the trial's pipeline, measure it, evaluate its best epoch on the test
split, and write RESULT.json beside the spec. A SIGINT (the sweep's stop) saves the training
state at the next step, as `sherl-pipe train` does; its handler is the first thing the job sets.
The job ends with the worker that started it (a parent-death signal, and a watch on its parent for
platforms without one): a job left behind would go on training and skew every later timing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from sherl_pipe.atomic import write_atomically
from sherl_pipe.cache import Cache
from sherl_pipe.cache.location import Location, pipeline_location
from sherl_pipe.compare.measure import peak_mib, reset_peak, rss_mib, state_bytes
from sherl_pipe.devices import autocast, pick_device
from sherl_pipe.engine import open_trial
from sherl_pipe.errors import SherlError
from sherl_pipe.evaluation import evaluate
from sherl_pipe.families import family_of
from sherl_pipe.methods.spec import config_from_manifest
from sherl_pipe.training import train
from sherl_pipe.training.inference import loss_fn
from sherl_pipe.training.rng import run_rng
from sherl_pipe.training.checkpoint import keep_best_only
from sherl_pipe.training.run import build_session, open_training_cache


class Interrupted:
    """should_stop: whether a SIGINT arrived (the parent's way to say 'stop')."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGINT, lambda *a: setattr(self, "flag", True))

    def __call__(self) -> bool:
        return self.flag


PARENT_ENV = "SHERL_COMPARE_WORKER_PID"  # the worker that started the job (compare/trial.py)


def end_with_parent(parent: int | None) -> None:
    """This process ends when PARENT (the worker's pid) does."""
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(3)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def measure_state(pipeline) -> dict:
    """The training state's bytes at the first training batch of the run's own order."""

    device = pick_device(pipeline.train.device)
    cache, spec, eval_split = open_training_cache(pipeline, check_cache=False)
    with run_rng(pipeline.train.seed, device):
        s = build_session(pipeline, cache, spec, eval_split, device, log=lambda m: None)
        first = s.sampler.batches(0)[0]
        batch = next(iter(s.train_src.iterate([first]))).to(device)
        batch = s.live(batch) if s.live is not None else batch
        s.model.train()

        def step():
            with autocast(device, pipeline.train.precision):
                return loss_fn(spec, s.model.forward_batch(batch), batch.labels)

        out = state_bytes(s.model, step)
    return {**out, "batch": [len(first), int(batch.mask.shape[1])]}


def predictions_on_test(pipeline, run_dir: Path) -> dict:
    """The best checkpoint's metrics on the pipeline's evaluation split, and each row's prediction
    and gold value."""
    import csv


    split = pipeline.evaluate.split
    metrics = evaluate(run_dir, split, "best", storage_options=pipeline_location(pipeline, training=True).options)
    with open(run_dir / f"predictions_{split}_best.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    value = "label" if "label" in rows[0] else "value"
    return {"metrics": metrics, "pred": [r[value] for r in rows], "gold": [r["gold"] for r in rows]}


def warm_imports(pipeline) -> None:
    """Import what training will, before the idle baseline is taken: the peak above idle is then
    the run's memory (weights, data, activations), not the libraries' code."""
    import peft  # noqa: F401
    import transformers


    config = config_from_manifest(Cache(pipeline_location(pipeline, training=True)).manifest)
    family = family_of(config.model_type)
    family.layer_class(), family.pooler_class()
    transformers.AutoModel  # noqa: B018 (the lazy module's import)
    pipeline.train.plugin  # noqa: B018 (the method's module)


def run(spec: dict, cache: dict | None = None, methods: dict | None = None,
        interrupted: Interrupted | None = None) -> dict:
    """SPEC as written by compare/trial.py; CACHE the cache's Location as JSON (its options may hold
    credentials) and METHODS the methods registered from code ({name: "module:class"}), which
    never travel in the spec file."""
    pipeline = open_trial(spec, "compare trial", methods or {}, Location(**cache) if cache else None)
    warm_imports(pipeline)
    values: list[float] = []
    epoch_seconds: list[float] = []  # the run's training time at each epoch's end

    def on_epoch(r: dict) -> None:
        values.append(r["train_loss"] if spec["metric"] == "train_loss" else r["eval"][spec["metric"]])
        epoch_seconds.append(r["seconds"])

    baseline = rss_mib()
    reset_peak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(pipeline, overwrite=True, log=lambda m: None, on_epoch=on_epoch, check_cache=False,
                   tier_weights=False, should_stop=interrupted or Interrupted())
    out = {"number": spec["number"], "values": values, "epochs": result.epochs_done, "steps": result.steps,
           "train_seconds": result.seconds, "epoch_seconds": epoch_seconds, "stop_reason": result.stop_reason,
           "max_seconds": pipeline.train.max_seconds, "seconds": time.perf_counter() - t0,
           "samples_per_s": result.samples_per_s, "baseline_mib": baseline, "peak_mib": peak_mib(),
           "cuda_max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "state": "interrupted" if result.interrupted else "complete"}
    if result.interrupted:
        return out
    info = json.loads((Path(result.run_dir) / "model.json").read_text())
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    out.update(trainable_parameters=summary.get("trainable_parameters", info["trainable_parameters"]), state_bytes=measure_state(pipeline),
               test=predictions_on_test(pipeline, Path(result.run_dir)))
    return out


def main(argv: list[str]) -> int:
    interrupted = Interrupted()  # first: a stop that comes while the job starts is not lost
    parent = os.environ.get(PARENT_ENV)
    end_with_parent(int(parent) if parent else None)
    spec_path = Path(argv[0])
    try:
        hidden = json.loads(sys.stdin.read() or "null") or {}
        spec = json.loads(spec_path.read_text())
        out = run(spec, hidden.get("cache"), hidden.get("methods"), interrupted)
    except SherlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_atomically(spec_path.with_name("result.json"), (json.dumps(out) + "\n").encode())
    if out["state"] == "complete" and spec.get("keep", "best") == "best":  # scored: nothing will resume it
        keep_best_only(Path(spec["pipeline"]["train"]["run_dir"]), log=lambda m: print(m, file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
