"""The command line: one clear line and a non-zero exit for bad input; reports for good input."""

import json

import pytest

from click.testing import CliRunner

from conftest import write_pipeline
from sherl_pipe.cli import main


def test_extract_then_info(tmp_path, bert_dir, text_csv):
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "unused")
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(pipe), "--cache", str(tmp_path / "c"), "--set", "extract.chunk_size=8"])
    assert result.exit_code == 0, result.output
    assert "resolved config" in result.stderr and "saved in the cache's manifest" in result.stderr
    assert "chunk_size" not in result.stderr  # printed in full only with --verbose
    assert "cache" in result.stdout and "complete" in result.stdout and "real tokens" in result.stdout
    info = runner.invoke(main, ["info", str(tmp_path / "c")])
    assert info.exit_code == 0 and "split train" in info.output and "(complete" in info.output
    report = json.loads(runner.invoke(main, ["info", str(tmp_path / "c"), "--json"]).output)
    assert report["complete"] and report["manifest"]["chunk_size"] == 8
    assert report["splits"]["train"]["arrays"]["h2"]["chunks"][0] == 8


def test_errors_are_one_line_and_exit_2(tmp_path, bert_dir, text_csv):
    runner = CliRunner()
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "c")
    for args, message in [
        (["extract", str(pipe), "--set", "data.label_column=nope"], "no column 'nope'"),
        (["extract", str(tmp_path / "none.toml")], "not found"),
        (["extract", str(pipe), "--set", "extract.codec=gzip"], "extract.codec = 'gzip' is not one of"),
        (["info", str(tmp_path / "nothing")], "nothing: not found; give a cache (made by `extract` or `run`)"),
        (["info", str(tmp_path)], "neither a cache (no zarr.json) nor a run folder (no model.json)"),
    ]:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
        assert "Traceback" not in result.output


def test_run_refuses_a_training_its_cache_could_not_serve_before_extracting(tmp_path, bert_dir, text_csv):
    """`run` extracts and then trains: a train section the planned cache cannot serve (k >= L, an
    anchor above the cut, a tier not stored) used to be found only after the extraction."""
    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "c")
    for sets, message in [
        (["train.late_layers=3"], "train.late_layers = 3: the backbone has 3 layers"),
        (["extract.late_layers=2", "train.late_layers=1"], "train.late_layers = 1: its anchor h[2] is not in the cache"),
        (["extract.tiers=[0]", "train.late_layers=1", "train.tiers=[1]"], "train.tiers: tier 1 is not a stored tier"),
        (['extract.splits=["train", "test"]', "train.eval_split=validation"],
         "train.eval_split = 'validation': the cache extract.* describes"),
        (["evaluate.split=dev"], "evaluate.split = 'dev': the cache extract.* describes"),
    ]:
        args = ["run", str(pipe), "-q", "--run-dir", str(tmp_path / "r")] + [x for s in sets for x in ("--set", s)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (sets, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "nothing was extracted" in result.stderr
        assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_run_keeps_a_cache_that_serves_its_training_over_one_that_would_not(tmp_path, bert_dir, text_csv):
    """A cache extracted with k = 1 serves train.late_layers = 1; `run` asked to extract with k = 2
    (which would not) says how to reuse the cache, and with --overwrite refuses before replacing it
    with one its training cannot read (the old code replaced it, then failed)."""
    from sherl_pipe.cache import Cache

    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "c")
    assert CliRunner().invoke(main, ["extract", str(pipe), "-q"]).exit_code == 0
    before = Cache(tmp_path / "c").manifest["created"], sorted(p.name for p in (tmp_path / "c").iterdir())
    args = ["run", str(pipe), "-q", "--run-dir", str(tmp_path / "r"), "--set", "extract.late_layers=2",
            "--set", "train.late_layers=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "already serves train.late_layers = 1" in result.stderr, result.output
    assert "keep extract.late_layers = 1" in result.stderr
    result = CliRunner().invoke(main, args + ["--overwrite"])
    assert result.exit_code == 2 and "its anchor h[2] is not in the cache" in result.stderr, result.output
    assert "nothing was extracted" in result.stderr
    assert (Cache(tmp_path / "c").manifest["created"], sorted(p.name for p in (tmp_path / "c").iterdir())) == before


def test_incomplete_cache_is_reported_incomplete(tmp_path, bert_dir, text_csv):
    from sherl_pipe.cache import Cache
    from sherl_pipe.config import load_pipeline
    from sherl_pipe.extraction import extract

    pipe = write_pipeline(tmp_path / "p.toml", bert_dir, text_csv, tmp_path / "c")
    extract(load_pipeline(str(pipe)))
    done = Cache(tmp_path / "c").group["train/done"]
    import zarr

    zarr.open_array(str(tmp_path / "c" / "train" / "done"), mode="r+")[1] = 0
    result = CliRunner().invoke(main, ["info", str(tmp_path / "c")])
    assert "INCOMPLETE" in result.output and f"{done.shape[0] - 1}/{done.shape[0]} blocks" in result.output


def test_real_data_tests_fail_rather_than_skip_in_ci(monkeypatch):
    import pytest

    import conftest

    monkeypatch.setattr(conftest, "SST2", conftest.SST2 / "nonesuch")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the real-data tests must run"):
        conftest.require_sst2()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        conftest.require_sst2()


def test_progress_counts_are_whole_numbers():
    import io

    from sherl_pipe.cli import Progress

    out = io.StringIO()
    bar = Progress("train", "step", quiet=False, file=out)
    bar.set_total(13)
    bar(0)
    bar.close()
    assert "0/13" in out.getvalue() and "0.00" not in out.getvalue() and "13.0" not in out.getvalue()


@pytest.mark.slow
def test_info_in_a_fresh_process(tmp_path, fp32_cache):
    """What a user runs: `sherl-pipe info` as its own process (in-process tests import modules in
    an order that hid an import cycle here)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sherl_pipe", "info", str(fp32_cache)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "split train" in proc.stdout


def test_the_legacy_mode_option_never_silently_overrides_the_method(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """`--mode live --method unipt` trained SHERL without a word (--mode overwrote --method); now
    a contradiction is one line, and --mode with a method it agrees with still works."""
    from conftest import one_error_line, write_full_pipeline

    p = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                            'dtype = "float32"', "max_steps = 1")
    r = CliRunner().invoke(main, ["train", str(p), "-q", "--mode", "live", "--method", "unipt"])
    one_error_line(r, "--mode live means --method sherl --source live", "--method unipt")
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(main, ["train", str(p), "-q", "--mode", "live", "--method", "sherl"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "model.json").read_text())["spec"]["source"] == "live"


def test_the_resolved_config_is_printed_in_full_only_with_verbose(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """Every command printed about 100 lines of resolved config; now one line says where it is saved."""
    from conftest import write_full_pipeline

    p = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                            'dtype = "float32"', "max_steps = 1")
    r = CliRunner().invoke(main, ["train", str(p), "--set", "train.lr=0.002"])
    assert r.exit_code == 0, r.output
    line = f"resolved config ({p}) saved in {tmp_path / 'run'}/config.json; --verbose prints it"
    assert line in r.stderr and '"lr": 0.002' not in r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 0.002
    r = CliRunner().invoke(main, ["train", str(p), "--overwrite", "-v", "--set", "train.lr=0.002"])
    assert r.exit_code == 0 and '"lr": 0.002' in r.stderr, r.output
