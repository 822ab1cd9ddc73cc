"""The `sherl-pipe` command: thin click commands over the library.

Every `SherlError` becomes one line on stderr and exit status 2; nothing else is caught.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from sherl_pipe import __version__
from sherl_pipe.errors import SherlError


def _fail_cleanly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SherlError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


class Progress:
    """A tqdm bar (samples/s and ETA) on stderr; silent when stderr is not a terminal or --quiet."""

    def __init__(self, desc: str, unit: str, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, unit_scale=True, disable=True if quiet else None,
                        file=sys.stderr, dynamic_ncols=True)

    def set_total(self, total: int):
        self.bar.total = total
        self.bar.refresh()

    def set_postfix(self, **kw):
        self.bar.set_postfix(**kw, refresh=False)

    def __call__(self, n: int):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def _pipeline_args(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="Override one pipeline setting (repeatable); wins over the file.")(fn)
    fn = click.argument("pipeline", default="quickstart")(fn)
    return fn


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sherl-pipe")
def main():
    """sherl-pipe: cache a frozen encoder's early layers once, then train SHERL from the cache.

    PIPELINE is a pipeline file (TOML) or the name of a packaged one (default: quickstart).
    Settings resolve in this order, later winning: defaults < the file < --set < explicit options.
    """


@main.command()
@_pipeline_args
@click.option("--cache", default=None, help="Cache folder (overrides extract.cache).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None, help="Storage dtype.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache whose manifest differs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or resolved config.")
@_fail_cleanly
def extract(pipeline, overrides, cache, dtype, overwrite, quiet):
    """Run the frozen early layers once and cache their per-layer activations."""
    from sherl_pipe.config import dumps, load_pipeline
    from sherl_pipe.extraction import extract as run_extract

    pipe = load_pipeline(pipeline, overrides).with_overrides("extract", cache=cache, dtype=dtype)
    if not quiet:
        click.echo(f"resolved config ({pipe.origin}):\n{dumps(pipe)}", err=True)
    bar = Progress("extract", "sample", quiet)
    try:
        summary = run_extract(pipe, overwrite=overwrite, progress=bar)
    finally:
        bar.close()
    _print_extract_summary(summary)


def _print_extract_summary(s) -> None:
    block_s = s.timings.get("blocks", 0.0) or 1e-9
    resumed = " (resumed)" if s.resumed else ""
    click.echo(f"cache {s.cache}{resumed}: complete")
    for name, sp in s.splits.items():
        click.echo(f"  {name}: {sp.samples} samples extracted, {sp.blocks_written}/{sp.blocks_total} blocks written now")
    if s.samples == 0:
        click.echo(f"  nothing to do: every block was already done; {_human(s.bytes_on_disk)} on disk")
        return
    click.echo(f"  {s.samples} samples, {s.real_tokens} real tokens, {_human(s.bytes_on_disk)} on disk, "
               f"{s.samples / block_s:.1f} samples/s, {s.bytes_on_disk / 2**20 / s.seconds:.1f} MB/s overall, "
               f"{s.seconds:.1f} s")


def _train_options(fn):
    fn = click.option("--run-dir", default=None, help="Run folder (overrides train.run_dir).")(fn)
    fn = click.option("--mode", type=click.Choice(["cached", "live", "full-finetune"]), default=None,
                      help="cached (default), live early layers, or full fine-tuning.")(fn)
    fn = click.option("--late-tuning", type=click.Choice(["frozen", "norm-bias", "lora", "full"]), default=None,
                      help="How the late layers train.")(fn)
    fn = click.option("--epochs", type=int, default=None, help="Epochs (overrides train.epochs).")(fn)
    fn = click.option("--resume", is_flag=True, help="Continue an existing run folder from its last checkpoint.")(fn)
    return fn


def _apply_train_options(pipe, cache, run_dir, mode, late_tuning, epochs):
    pipe = pipe.with_overrides("extract", cache=cache)
    return pipe.with_overrides("train", run_dir=run_dir, mode=mode, late_tuning=late_tuning, epochs=epochs)


def _run_training(pipe, resume, overwrite, quiet):
    import torch

    from sherl_pipe.training import train as run_train

    torch.set_num_threads(pipe.train.threads)
    bar = Progress("train", "step", quiet)
    log = (lambda msg: None) if quiet else (lambda msg: (bar.bar.write(msg, file=sys.stderr)))
    try:
        result = run_train(pipe, resume=resume, overwrite=overwrite, progress=bar, log=log)
    finally:
        bar.close()
    best = result.best
    click.echo(f"run {result.run_dir}: {result.steps} steps, {result.epochs_done} epochs, "
               f"{result.samples_per_s:.1f} samples/s, {result.seconds:.1f} s"
               + (" (stopped early)" if result.stopped_early else ""))
    if best:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
        click.echo(f"  best on {best['split']}: epoch {best['epoch']}: {shown}")
    return result


@main.command()
@_pipeline_args
@click.option("--cache", default=None, help="Cache folder to train from (overrides extract.cache).")
@_train_options
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, resolved config or epoch lines.")
@_fail_cleanly
def train(pipeline, overrides, cache, run_dir, mode, late_tuning, epochs, resume, overwrite, quiet):
    """Train the consolidation module, late layer(s) and head from a cache."""
    from sherl_pipe.config import dumps, load_pipeline

    pipe = _apply_train_options(load_pipeline(pipeline, overrides), cache, run_dir, mode, late_tuning, epochs)
    if not quiet:
        click.echo(f"resolved config ({pipe.origin}):\n{dumps(pipe)}", err=True)
    _run_training(pipe, resume, overwrite, quiet)


def _print_eval(result: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and k != "majority_baseline")
    click.echo(f"{result['split']} ({result['rows']} rows, {result['checkpoint']} checkpoint): {shown}")
    if "majority_baseline" in result:
        click.echo(f"  majority-class baseline accuracy {result['majority_baseline']:.4f}; "
                   f"margin {100 * (result['accuracy'] - result['majority_baseline']):+.1f} points")


@main.command()
@click.argument("run_dir")
@click.option("--split", default="test", show_default=True, help="Cached split to evaluate.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--cache", default=None, help="The cache, if it moved since training.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@_fail_cleanly
def evaluate(run_dir, split, checkpoint, cache, batch_size):
    """Evaluate a trained run on a cached split (writes eval_SPLIT.json and predictions_SPLIT.csv)."""
    from sherl_pipe.evaluation import evaluate as run_eval

    _print_eval(run_eval(run_dir, split, checkpoint, batch_size, cache))


@main.command()
@click.argument("run_dir")
@click.option("--input", "input_path", required=True, help="Text file (csv, tsv, jsonl, parquet) with the cache's text column(s).")
@click.option("--output", "output_path", required=True, help="Where to write predictions (.csv or .jsonl).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["auto", "csv", "tsv", "jsonl", "parquet"]), default="auto")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--backbone", default=None, help="The backbone folder, if it moved since training.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@_fail_cleanly
def predict(run_dir, input_path, output_path, checkpoint, fmt, encoding, backbone, batch_size):
    """Predict labels (and probabilities) for new raw text with a trained run."""
    from sherl_pipe.prediction import predict as run_predict

    n = run_predict(run_dir, input_path, output_path, checkpoint, batch_size, fmt, encoding, backbone)
    click.echo(f"wrote {n} predictions to {output_path}")


@main.command()
@_pipeline_args
@_train_options
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder (and a cache that differs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or resolved config.")
@_fail_cleanly
def run(pipeline, overrides, run_dir, mode, late_tuning, epochs, resume, overwrite, quiet):
    """extract (reusing a matching cache) -> train -> evaluate, in one go."""
    from sherl_pipe.config import dumps, load_pipeline
    from sherl_pipe.evaluation import evaluate as run_eval
    from sherl_pipe.extraction import extract as run_extract

    pipe = _apply_train_options(load_pipeline(pipeline, overrides), None, run_dir, mode, late_tuning, epochs)
    if not quiet:
        click.echo(f"resolved config ({pipe.origin}):\n{dumps(pipe)}", err=True)
    from sherl_pipe.errors import CacheMismatch

    bar = Progress("extract", "sample", quiet)
    try:
        try:  # a matching cache is reused (and finished if a run was interrupted) ...
            summary = run_extract(pipe, overwrite=False, progress=bar)
        except CacheMismatch:
            if not overwrite:
                raise
            summary = run_extract(pipe, overwrite=True, progress=bar)  # ... one that differs, only on request
    finally:
        bar.close()
    _print_extract_summary(summary)
    result = _run_training(pipe, resume, overwrite, quiet)
    _print_eval(run_eval(result.run_dir, pipe.evaluate.split, pipe.evaluate.checkpoint, pipe.evaluate.batch_size))


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@_fail_cleanly
def info(cache, as_json):
    """Show a cache's manifest, splits, arrays, sizes and completeness."""
    from sherl_pipe.inspect import cache_report, format_report

    report = cache_report(cache)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


if __name__ == "__main__":  # pragma: no cover
    main()
