"""The `sherl-pipe` command: thin click commands over the library.

Every `SherlError`, every refusal by the operating system and every failure of a storage backend
(cache.access.backend_error_line) becomes one line on stderr starting with `error:` and exit
status 2; Ctrl-C is one line and status 130. Nothing else is caught: a bug keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading

import click

from sherl_pipe import __version__
from sherl_pipe.methods import LEGACY_MODES
from sherl_pipe.errors import SherlError, os_error_message


def _fail_cleanly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SherlError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            click.echo(f"error: {os_error_message(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; what was finished is kept: rerun the same command to continue "
                       "(train: with --resume)", err=True)
            sys.exit(130)
        except Exception as exc:
            from sherl_pipe.cache.access import backend_error_line  # loaded when the command runs: --help stays fast

            line = backend_error_line(exc)  # a storage backend's failure inside zarr's own reads
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(2)

    return wrapper


class Progress:
    """A tqdm bar (rate and ETA) on stderr; silent when stderr is not a terminal or --quiet."""

    def __init__(self, desc: str, unit: str, quiet: bool, file=None):
        from tqdm import tqdm

        # counts stay whole numbers (unit_scale would show 0.00/13.0); a given file is always written
        self.bar = tqdm(desc=desc, unit=unit, disable=True if quiet else (False if file else None),
                        file=file or sys.stderr, dynamic_ncols=True, unit_scale=False)

    def set_total(self, total: int):
        self.bar.total = total
        self.bar.refresh()

    def set_postfix(self, **kw):
        self.bar.set_postfix(**kw, refresh=False)

    def __call__(self, n: int):
        self.bar.update(n)

    def write(self, msg: str):
        self.bar.write(msg, file=sys.stderr)

    def close(self):
        self.bar.close()


TRAIN_INTERRUPT = "interrupt: saving the training state at the next step (press Ctrl-C again to stop at once)"
SWEEP_INTERRUPT = ("interrupt: no new trials; the running ones save their state at their next step and are recorded "
                   "as interrupted, to run again on resume (press Ctrl-C again to stop at once)")


class StopOnInterrupt:
    """The first Ctrl-C asks the training loop (or the sweep) to stop at the next step boundary
    and save its state; a second one stops at once. Only the main thread can take signals."""

    def __init__(self, say, message: str = TRAIN_INTERRUPT):
        self.requested, self.say, self.message, self.previous = False, say, message, None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say(self.message)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _pipeline_args(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="Override one pipeline setting (repeatable); wins over the file.")(fn)
    fn = click.argument("pipeline", default="quickstart")(fn)
    return fn


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _verbose(fn):
    return click.option("--verbose", "-v", is_flag=True, help="Print the resolved config in full.")(fn)


def _show_config(pipe, quiet: bool, verbose: bool, saved: str) -> None:
    """The resolved config in full with --verbose; else one line saying where it is saved (it was
    about 100 lines on every command)."""
    from sherl_pipe.config import dumps  # loaded when the command runs: --help stays fast

    if verbose:
        _say(f"resolved config ({pipe.origin}):\n{dumps(pipe)}")
    elif not quiet:
        _say(f"resolved config ({pipe.origin}) saved in {saved}; --verbose prints it")


def _say(msg: str) -> None:
    click.echo(msg, err=True)


class OneLineErrors(click.Group):
    """click's usage errors (a bad option value, a missing argument) as one `error:` line and exit
    status 2, like every other bad input; the help is one `--help` away."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "sherl-pipe"
            click.echo(f"error: {exc.format_message()} (see `{command} --help`)", err=True)
            sys.exit(2)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sherl-pipe")
def main():
    """sherl-pipe: cache a frozen encoder's early layers once, then train SHERL from the cache.

    PIPELINE is a pipeline file (TOML) or the name of a packaged one (default: quickstart).
    Settings resolve in this order, later winning: defaults < the file < --set < explicit options.
    """


def _write(msg: str) -> None:
    """A line on stderr above any progress bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _hooks(pipe, quiet: bool, interrupt: str = TRAIN_INTERRUPT):
    """The runners' hooks (runners.Hooks) for a command: progress bars, lines on stderr (none of
    the chatter with --quiet), each stage's result printed as it ends, Ctrl-C as StopOnInterrupt."""
    from sherl_pipe.runners import Hooks  # loaded when the command runs: --help stays fast

    def on_stage(name: str, value) -> None:
        if name == "extract":
            _print_extract_summary(value, pipe)
        elif name == "train" and not value.interrupted:
            _print_training(value)

    return Hooks(progress=lambda desc, unit: Progress(desc, unit, quiet), log=(lambda m: None) if quiet else _write,
                 say=_say, on_stage=on_stage, stopper=lambda: StopOnInterrupt(_write, interrupt), threads=True)


@main.command()
@_pipeline_args
@click.option("--cache", default=None, help="Cache folder or URL, e.g. s3://bucket/prefix (overrides extract.cache).")
@click.option("--dtype", type=click.Choice(["float16", "float32", "int8", "float8"]), default=None,
              help="Storage format of the tiers (int8, float8: lossy, half the bytes).")
@click.option("--scheduler", default=None, help="A dask scheduler's address: extract on its workers (default: "
              "extract.workers local processes).")
@click.option("--overwrite", is_flag=True, help="Replace an existing sherl-pipe cache whose manifest differs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or resolved config.")
@_verbose
@_fail_cleanly
def extract(pipeline, overrides, cache, dtype, scheduler, overwrite, quiet, verbose):
    """Run the frozen early layers once and cache their per-layer activations."""
    from sherl_pipe.config import load_pipeline  # loaded when the command runs: --help stays fast

    from sherl_pipe import runners  # loaded when the command runs: --help stays fast

    pipe = load_pipeline(pipeline, overrides).with_overrides("extract", cache=cache, dtype=dtype)
    _show_config(pipe, quiet, verbose, f"the cache's manifest (`sherl-pipe info {pipe.extract.cache} --json`)")
    _print_extract_summary(runners.extract(pipe, overwrite, scheduler=scheduler, hooks=_hooks(pipe, quiet)), pipe)


def _print_extract_summary(s, pipe) -> None:
    """An extraction's summary; None: the cache was complete and matching (nothing extracted)."""
    if s is None:
        click.echo(f"cache {pipe.extract.cache}: complete, matches the pipeline")
        return
    block_s = s.timings.get("blocks", 0.0) or 1e-9
    state = "already complete" if s.already_complete else ("complete (resumed)" if s.resumed else "complete")
    click.echo(f"cache {s.cache}: {state}")
    if s.blocks_repaired:
        click.echo(f"  {s.blocks_repaired} block(s) had missing chunks and were written again")
    for name, sp in s.splits.items():
        click.echo(f"  {name}: {sp.samples} samples extracted, {sp.blocks_written}/{sp.blocks_total} blocks written now")
    if s.samples == 0:
        click.echo(f"  nothing to do: every block was already done; {_mib(s.bytes_on_disk)} on disk")
        return
    click.echo(f"  {s.samples} samples, {s.real_tokens} real tokens, {_mib(s.bytes_on_disk)} on disk, "
               f"{s.samples / block_s:.1f} samples/s, {s.bytes_on_disk / 2**20 / s.seconds:.1f} MiB/s overall, "
               f"{s.seconds:.1f} s")


def _train_options(fn):
    fn = click.option("--run-dir", default=None, help="Run folder (overrides train.run_dir).")(fn)
    fn = click.option("--method", default=None, help="Training method (overrides train.method): sherl, unipt, "
                      "lst, linear-probe, scalar-mix, lora-finetune, full-finetune.")(fn)
    fn = click.option("--source", type=click.Choice(["cached", "live"]), default=None,
                      help="Tiers from the cache (default) or the early layers run live.")(fn)
    fn = click.option("--mode", type=click.Choice(list(LEGACY_MODES)), default=None, hidden=True,
                      help="Before --method and --source: cached, live or full-finetune.")(fn)
    fn = click.option("--late-tuning", type=click.Choice(["frozen", "norm-bias", "lora", "full"]), default=None,
                      help="How the late layers train.")(fn)
    fn = click.option("--epochs", type=click.IntRange(min=0), default=None, help="Epochs (overrides train.epochs).")(fn)
    fn = click.option("--resume", is_flag=True, help="Continue an existing run folder from its last checkpoint.")(fn)
    return fn


def _apply_train_options(pipe, cache, run_dir, method, source, mode, late_tuning, epochs):
    if mode is not None:  # the option from before methods: what it meant
        meant = LEGACY_MODES[mode]
        if (method or meant[0]) != meant[0] or (source or meant[1]) != meant[1]:
            raise SherlError(f"--mode {mode} means --method {meant[0]} --source {meant[1]}, which contradicts "
                             f"--method {method or meant[0]} --source {source or meant[1]}; give --method and "
                             f"--source only (--mode is the option from before methods)")
        method, source = meant
    pipe = pipe.with_overrides("extract", cache=cache)
    return pipe.with_overrides("train", run_dir=run_dir, method=method, source=source, late_tuning=late_tuning,
                               epochs=epochs)


def _print_training(result) -> None:
    from sherl_pipe.inspect import counted  # loaded when the command runs: --help stays fast

    best = result.best
    click.echo(f"run {result.run_dir}: {result.steps} steps, {counted(result.epochs_done, 'epoch')}, "
               f"{result.samples_per_s:.1f} samples/s, {result.seconds:.1f} s"
               + (f" (stopped: {result.stop_reason})" if result.stop_reason else ""))
    if best:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
        click.echo(f"  best on {best['split']}: epoch {best['epoch']}: {shown}")


def _exit_if_interrupted(result) -> None:
    if result.interrupted:
        _say(f"interrupted: run {result.run_dir} saved at step {result.steps}; continue it with the same command "
             f"and --resume")
        sys.exit(130)


@main.command()
@_pipeline_args
@click.option("--cache", default=None, help="Cache folder to train from (overrides extract.cache).")
@_train_options
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, resolved config or epoch lines.")
@_verbose
@_fail_cleanly
def train(pipeline, overrides, cache, run_dir, method, source, mode, late_tuning, epochs, resume, overwrite, quiet,
          verbose):
    """Train the consolidation module, late layer(s) and head from a cache."""
    from sherl_pipe.config import load_pipeline  # loaded when the command runs: --help stays fast

    from sherl_pipe import runners  # loaded when the command runs: --help stays fast

    pipe = _apply_train_options(load_pipeline(pipeline, overrides), cache, run_dir, method, source, mode, late_tuning,
                                epochs)
    _show_config(pipe, quiet, verbose, f"{pipe.train.run_dir}/config.json")
    _exit_if_interrupted(runners.train(pipe, resume, overwrite, _hooks(pipe, quiet)))


def _print_eval(result: dict) -> None:
    skip = {"majority_baseline", "baseline"}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float) and k not in skip)
    click.echo(f"{result['split']} ({result['rows']} rows, {result['checkpoint']} checkpoint): {shown}")
    if "majority_baseline" in result:
        click.echo(f"  majority-class baseline accuracy {result['majority_baseline']:.4f}; "
                   f"margin {100 * (result['accuracy'] - result['majority_baseline']):+.1f} points")
    if "baseline" in result:
        b = result["baseline"]
        click.echo(f"  training-mean baseline: mse {b['mse']:.4f} (pearson and spearman are undefined for a "
                   f"constant prediction); mse ratio {result['mse'] / b['mse']:.3f}" if b["mse"] > 0 else
                   "  training-mean baseline: mse 0")


@main.command()
@click.argument("run_dir")
@click.option("--split", default="test", show_default=True, help="Cached split to evaluate.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--cache", default=None, help="The cache, if it moved since training.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@_fail_cleanly
def evaluate(run_dir, split, checkpoint, cache, batch_size):
    """Evaluate a trained run on a cached split (writes eval_SPLIT_CHECKPOINT.json and
    predictions_SPLIT_CHECKPOINT.csv in the run folder)."""
    from sherl_pipe.evaluation import evaluate as run_eval  # loaded when the command runs: --help stays fast

    _print_eval(run_eval(run_dir, split, checkpoint, batch_size, cache))


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.argument("out", metavar="OUT")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write model.int8.onnx (dynamic int8 quantization) and its measured accuracy.")
@_fail_cleanly
def export(run_dir, out, fmt, quantize):
    """Export a finished run to the new folder OUT: model.onnx (the whole inference path), the
    tokenizer, labels.json and a model card; runs with ONNX Runtime alone."""
    from sherl_pipe.export import export as run_export  # loaded when the command runs: --help stays fast

    folder = run_export(run_dir, out, fmt, quantize, log=lambda m: click.echo(m, err=True))
    click.echo(f"exported {run_dir} to {folder}")


@main.command()
@click.argument("path", metavar="RUN_OR_EXPORT")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows a batch gathers at most (and a request may hold).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long a batch waits for more requests after its first.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="ONNX Runtime's threads (0: its default).")
@click.option("--int8", is_flag=True,
              help="Serve the export's model.int8.onnx (export --quantize int8; its card gives its accuracy).")
@_fail_cleanly
def serve(path, host, port, max_batch, max_wait_ms, threads, int8):
    """Serve a run or an export folder over HTTP (POST /predict, GET /health) until Ctrl-C."""
    from sherl_pipe.serve import serve as run_serve  # loaded when the command runs: --help stays fast

    run_serve(path, host, port, max_batch, max_wait_ms, threads, log=lambda m: click.echo(m, err=True), int8=int8)


@main.command()
@click.argument("run_dir")
@click.option("--input", "input_path", required=True, help="Text file (csv, tsv, jsonl, parquet) with the cache's text column(s).")
@click.option("--output", "output_path", required=True, help="Where to write predictions: a .csv or .jsonl file.")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["auto", "csv", "tsv", "jsonl", "parquet"]), default="auto")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--text-column", default=None, help="The input's text column (default: the training data's).")
@click.option("--text-pair-column", default=None, help="The input's second text column, for text pairs.")
@click.option("--backbone", default=None, help="The backbone folder, if it moved since training.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--header/--no-header", default=None,
              help="Whether a CSV/TSV input has a header row (default: as the training data).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never the input file).")
@_fail_cleanly
def predict(run_dir, input_path, output_path, checkpoint, fmt, encoding, text_column, text_pair_column, backbone,
            batch_size, header, overwrite):
    """Predict labels (and probabilities) for new raw text with a trained run."""
    from sherl_pipe.prediction import predict as run_predict  # loaded when the command runs: --help stays fast

    n = run_predict(run_dir, input_path, output_path, checkpoint, batch_size, fmt, encoding, backbone,
                    text_column=text_column, text_pair_column=text_pair_column, overwrite=overwrite, header=header)
    click.echo(f"wrote {n} predictions to {output_path}")


@main.command()
@_pipeline_args
@_train_options
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder (and a cache that differs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or resolved config.")
@_verbose
@_fail_cleanly
def run(pipeline, overrides, run_dir, method, source, mode, late_tuning, epochs, resume, overwrite, quiet, verbose):
    """extract (reusing a matching cache) -> train -> evaluate, in one go."""
    from sherl_pipe import runners  # loaded when the command runs: --help stays fast
    from sherl_pipe.config import load_pipeline  # loaded when the command runs: --help stays fast

    pipe = _apply_train_options(load_pipeline(pipeline, overrides), None, run_dir, method, source, mode,
                                late_tuning, epochs)
    _show_config(pipe, quiet, verbose, f"{pipe.train.run_dir}/config.json")
    out = runners.run(pipe, resume, overwrite, _hooks(pipe, quiet))
    _exit_if_interrupted(out.train)
    _print_eval(out.metrics)


@main.command()
@click.argument("cache", metavar="CACHE_OR_RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@_fail_cleanly
def info(cache, as_json):
    """Show a cache's manifest, splits, arrays, sizes and completeness; or, for a run folder, its
    model, training summary and learned tier weights."""
    from sherl_pipe.inspect import cache_report, folder_kind, format_report, format_run_report, run_report  # loaded when the command runs: --help stays fast

    if folder_kind(cache) == "run":
        report = run_report(cache)
        click.echo(json.dumps(report, indent=2) if as_json else format_run_report(report))
        return
    report = cache_report(cache)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command()
@click.argument("cache")
@click.option("--mark-bad", is_flag=True, help="Mark the blocks holding bad chunks not done, so `extract` redoes them.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_fail_cleanly
def verify(cache, mark_bad, quiet):
    """Check every chunk's checksum and that no chunk is missing; exit 1 if any is bad."""
    from sherl_pipe.cache.verify import verify_cache  # loaded when the command runs: --help stays fast

    bar = Progress("verify", "chunk", quiet)
    try:
        report = verify_cache(cache, mark_bad=mark_bad, progress=bar)
    finally:
        bar.close()
    for problem in report.problems:
        click.echo(f"bad: {problem}")
    if report.ok:
        click.echo(f"cache {cache}: every chunk checks out ({report.chunks_checked} chunks)")
        return
    click.echo(f"cache {cache}: {len(report.problems)} bad chunk(s) of {report.chunks_checked}")
    if report.marked:
        n = sum(len(b) for b in report.marked.values())
        click.echo(f"marked {n} block(s) not done; run `sherl-pipe extract` with the cache's pipeline to redo them")
    else:
        click.echo("run again with --mark-bad, then `sherl-pipe extract`, to redo the damaged blocks")
    sys.exit(1)


@main.command()
@_pipeline_args
@click.option("--sweep", "sweep_file", default=None, help="A TOML file with the [sweep] table (else the pipeline's).")
@click.option("--sweep-dir", default=None, help="Sweep folder (overrides sweep.dir).")
@click.option("--scheduler", default=None, help="A dask scheduler's address (default: a local cluster).")
@click.option("--overwrite", is_flag=True, help="Start the sweep in its folder again (and replace a cache that differs).")
@click.option("--retry-failed", is_flag=True, help="Run the trials that failed again (once their cause is fixed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, resolved config or per-trial lines.")
@_verbose
@_fail_cleanly
def sweep(pipeline, overrides, sweep_file, sweep_dir, scheduler, overwrite, retry_failed, quiet, verbose):
    """Many training trials over one cache: extract (reusing a matching cache), then an Optuna search
    run on dask workers; rerun the same command to resume. Ends with trials.csv, a leaderboard,
    best.toml and plots in the sweep folder."""
    from sherl_pipe.config import load_pipeline  # loaded when the command runs: --help stays fast
    from sherl_pipe import runners  # loaded when the command runs: --help stays fast

    pipe = load_pipeline(pipeline, overrides)
    _show_config(pipe, quiet, verbose, "each trial's run folder (config.json) and the sweep folder's best.toml")
    result = runners.sweep(pipe, sweep_file, sweep_dir, scheduler, overwrite, retry_failed,
                           _hooks(pipe, quiet, SWEEP_INTERRUPT))
    if result.interrupted:
        _say(f"interrupted: sweep {result.sweep_dir} stopped; {result.again} trial(s) recorded to run again; "
             f"rerun the same command to resume it")
        sys.exit(130)
    _print_sweep(result.report, result.sweep_dir)


def _print_sweep(report, sweep_dir) -> None:
    click.echo(report.leaderboard)
    if report.best is not None:
        click.echo(f"best: trial #{report.best['number']}, {report.metric} {report.best['value']:.4f}; its pipeline: "
                   f"{sweep_dir}/best.toml")
    click.echo(f"results in {sweep_dir}: trials.csv, leaderboard.txt, best.toml, metric_by_setting.png, history.png, "
               f"learning_curves.png")


@main.command()
@_pipeline_args
@click.option("--methods", default=None, help="Comma-separated methods (default: every registered one).")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per method.")
@click.option("--live-seeds", type=click.IntRange(min=1), default=None,
              help="Seeds for the fine-tuning methods (default: --seeds).")
@click.option("--budget", type=click.Choice(["epochs", "time"]), default="epochs", show_default=True,
              help="epochs: the pipeline's epochs for every method; time: full fine-tuning's training time.")
@click.option("--tune-lr", is_flag=True, help="A small per-method search of its rates (x 1/3, x 1, x 3) on the validation split first.")
@click.option("--compare-dir", default="sherl-compare/default", show_default=True, help="The compare folder.")
@click.option("--scheduler", default=None, help="A dask scheduler's address (default: a local cluster).")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Local cluster workers (0: one per core).")
@click.option("--overwrite", is_flag=True, help="Start the comparison in its folder again.")
@click.option("--retry-failed", is_flag=True, help="Run the trials that failed again (once their cause is fixed).")
@click.option("--keep", type=click.Choice(["best", "all"]), default="best", show_default=True,
              help="A scored trial's checkpoints: its best weights only, or also its resume state and last weights.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, resolved config or per-trial lines.")
@_verbose
@_fail_cleanly
def compare(pipeline, overrides, methods, seeds, live_seeds, budget, tune_lr, compare_dir, scheduler, workers,
            overwrite, retry_failed, keep, quiet, verbose):
    """Every method x seed from one cache (extracted first if needed), at equal epochs or equal time:
    compare.csv, compare.md and plots in the compare folder; rerun the same command to resume."""
    from sherl_pipe import runners  # loaded when the command runs: --help stays fast
    from sherl_pipe.config import load_pipeline  # loaded when the command runs: --help stays fast

    pipe = load_pipeline(pipeline, overrides)
    names = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    _show_config(pipe, quiet, verbose, f"{compare_dir}/compare.json")
    out = runners.compare(pipe, names, seeds, live_seeds, budget, tune_lr, compare_dir, scheduler, workers, overwrite,
                          retry_failed, _hooks(pipe, quiet, SWEEP_INTERRUPT), keep)
    if out["interrupted"]:
        _say(f"interrupted: compare {out['folder']} stopped; rerun the same command to resume it")
        sys.exit(130)
    click.echo(out["markdown"])
    click.echo(f"results in {out['folder']}: compare.csv, compare.md, accuracy_vs_memory.png, accuracy_vs_time.png")


@main.command("compare-report")
@click.argument("compare_dir")
@_fail_cleanly
def compare_report(compare_dir):
    """Rebuild a comparison's table and plots from its folder (also while it runs)."""
    from pathlib import Path

    from sherl_pipe.compare.report import build_report  # loaded when the command runs: --help stays fast

    click.echo(build_report(Path(compare_dir))["markdown"])


@main.command("sweep-report")
@click.argument("sweep_dir")
@_fail_cleanly
def sweep_report(sweep_dir):
    """Rebuild a sweep's table, leaderboard, best.toml and plots from its study (also while it runs)."""
    from pathlib import Path

    from sherl_pipe.sweep.report import build_report  # loaded when the command runs: --help stays fast

    _print_sweep(build_report(Path(sweep_dir)), sweep_dir)


if __name__ == "__main__":  # pragma: no cover
    main()
