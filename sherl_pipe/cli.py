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
    from sherl_pipe.extract import extract as run_extract

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
    click.echo(f"  {s.samples} samples, {s.real_tokens} real tokens, {_human(s.bytes_on_disk)} on disk, "
               f"{s.samples / block_s:.1f} samples/s, {s.bytes_on_disk / 2**20 / s.seconds:.1f} MB/s overall, "
               f"{s.seconds:.1f} s")


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
