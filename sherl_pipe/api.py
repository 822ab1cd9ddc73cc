"""The Python API: the functions the CLI runs, for notebooks and scripts.

    import sherl_pipe  # torch: loaded at the first call, `import sherl_pipe` stays light
    pipe = sherl_pipe.load_pipeline("quickstart", ["train.epochs=1"])
    sherl_pipe.extract(pipe)                      # stage one: the cache
    result = sherl_pipe.train(pipe)               # stage two, from the cache alone
    sherl_pipe.evaluate(result.run_dir, "test")   # metrics on a cached split
    sherl_pipe.predict(result.run_dir, ["what a great film"])  # labels and probabilities

As the commands do, `run` extracts if needed, trains and evaluates; `run_sweep` and `run_compare`
extract if needed, then run the trials (sherl_pipe/runners.py: their hooks for progress and Ctrl-C).

A pipeline is a `Pipeline` or the path (or packaged name) of a pipeline file. Nothing here changes
process-wide settings unless asked: `threads` sets torch's thread count for the call's process, as
the CLI does from the pipeline's `threads` keys; None leaves it as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from sherl_pipe.config import Pipeline, apply_overrides
from sherl_pipe.config import load_pipeline as _load


def load_pipeline(spec: str | None = "quickstart", overrides: Sequence[str] = ()) -> Pipeline:
    """A pipeline file (or packaged name) with `section.key=value` overrides applied."""
    return _load(spec, list(overrides))


def _pipeline(pipeline: Pipeline | str, overrides: Sequence[str]) -> Pipeline:
    if isinstance(pipeline, Pipeline):
        return apply_overrides(pipeline, overrides)
    return load_pipeline(str(pipeline), overrides)


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def extract(pipeline: Pipeline | str, overrides: Sequence[str] = (), overwrite: bool = False,
            threads: int | None = None, progress=None, log: Callable[[str], None] = print,
            scheduler: str | None = None):
    """Stage one: cache the pipeline's tiers (resumes an interrupted cache). Returns a summary.
    With extract.workers > 1 on a local dask cluster, with SCHEDULER on an existing one (in a
    script, call it under `if __name__ == "__main__":`: local workers start by importing it)."""
    from sherl_pipe.extraction import extract as run  # torch: loaded at the first call, `import sherl_pipe` stays light

    _threads(threads)
    return run(_pipeline(pipeline, overrides), overwrite=overwrite, progress=progress, log=log, scheduler=scheduler)


def train(pipeline: Pipeline | str, overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False,
          on_epoch: Callable[[dict], None] | None = None, threads: int | None = None, progress=None,
          log: Callable[[str], None] = print):
    """Stage two from the cache. `on_epoch(record)` sees each epoch's record (train loss and the
    evaluation) and may raise `sherl_pipe.StopTraining(reason)` to end the run. Returns a TrainResult."""
    from sherl_pipe.training import train as run  # torch: loaded at the first call, `import sherl_pipe` stays light

    _threads(threads)
    return run(_pipeline(pipeline, overrides), resume=resume, overwrite=overwrite, progress=progress, log=log,
               on_epoch=on_epoch)


def run(pipeline: Pipeline | str, overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False,
        hooks=None):
    """`sherl-pipe run`: extract (reusing a matching cache), train, evaluate on evaluate.split.
    Returns runners.RunResult (.extract, .train, .metrics); HOOKS: runners.Hooks."""
    from sherl_pipe import runners  # torch: loaded at the first call, `import sherl_pipe` stays light

    return runners.run(_pipeline(pipeline, overrides), resume, overwrite, hooks)


def run_sweep(pipeline: Pipeline | str, overrides: Sequence[str] = (), sweep_file: str | None = None,
              sweep_dir: str | None = None, scheduler: str | None = None, overwrite: bool = False,
              retry_failed: bool = False, hooks=None):
    """`sherl-pipe sweep`: the cache (extracted if needed), then the sweep's trials on dask (in a
    script, call it under `if __name__ == "__main__":`). Returns sweep.SweepResult."""
    from sherl_pipe import runners  # torch: loaded at the first call, `import sherl_pipe` stays light

    return runners.sweep(_pipeline(pipeline, overrides), sweep_file, sweep_dir, scheduler, overwrite, retry_failed,
                         hooks)


def run_compare(pipeline: Pipeline | str, methods: Sequence[str] | None = None, overrides: Sequence[str] = (),
                hooks=None, **options) -> dict:
    """`sherl-pipe compare`: the cache (extracted if needed), then every method x seed; OPTIONS as
    runners.compare (seeds, live_seeds, budget, tune_lr, compare_dir, scheduler, workers, overwrite,
    retry_failed, keep). Returns the report: its "markdown", "summary", "folder", "interrupted"."""
    from sherl_pipe import runners  # torch: loaded at the first call, `import sherl_pipe` stays light

    if isinstance(methods, str):  # as the command's --methods: names separated by commas
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    return runners.compare(_pipeline(pipeline, overrides), list(methods) if methods is not None else None,
                           hooks=hooks, **options)


def evaluate(run_dir: str | Path, split: str = "test", checkpoint: str = "best", batch_size: int = 128,
             cache: str | None = None) -> dict:
    """Metrics of a trained run on a cached split (writes eval_* and predictions_* in the run folder)."""
    from sherl_pipe.evaluation import evaluate as run  # torch: loaded at the first call, `import sherl_pipe` stays light

    return run(run_dir, split, checkpoint, batch_size, cache)


def predict(run_dir: str | Path, texts: Sequence[str], pairs: Sequence[str] | None = None,
            checkpoint: str = "best", batch_size: int = 128, backbone: str | None = None) -> list[dict]:
    """Labels and class probabilities (or values) for texts: one dict per text, in order."""
    import numpy as np

    from sherl_pipe.evaluation import prediction_records  # torch: loaded at the first call, `import sherl_pipe` stays light
    from sherl_pipe.prediction import Predictor  # torch: loaded at the first call, `import sherl_pipe` stays light

    predictor = Predictor.load(run_dir, checkpoint, backbone)
    outputs = predictor.outputs(list(texts), list(pairs) if pairs is not None else None, batch_size)
    t = predictor.trained
    records = prediction_records(t.spec, t.manifest["task"]["label_names"], outputs, np.arange(len(texts)))
    for r in records:
        r.pop("row")
    return records


def predict_file(run_dir: str | Path, input_path: str, output_path: str, checkpoint: str = "best",
                 **options) -> int:
    """`sherl-pipe predict`: a text file in, a .csv or .jsonl of predictions out; returns the rows."""
    from sherl_pipe.prediction import predict as run  # torch: loaded at the first call, `import sherl_pipe` stays light

    return run(run_dir, input_path, output_path, checkpoint, **options)


def verify(cache: str | Path, mark_bad: bool = False, storage_options: dict | None = None):
    """`sherl-pipe verify`: every chunk's checksum; returns a report (its .ok, .problems). CACHE is
    a folder or a URL (STORAGE_OPTIONS as in extract.storage_options)."""
    from sherl_pipe.cache.verify import verify_cache  # torch: loaded at the first call, `import sherl_pipe` stays light

    return verify_cache(cache, mark_bad=mark_bad, options=storage_options)
