"""bad sweep requests refused in one line before any trial (or the cache) starts."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from conftest import one_error_line
from sweep_helpers import GRID, sweep_pipeline

from sherl_pipe.cli import main
from sherl_pipe.config import load_pipeline
from sherl_pipe.errors import SherlError


@pytest.mark.parametrize("table, message", [
    ('[sweep]\n[sweep.space]\nextract = {dtype = ["float32"]}\n', r"sweep.space.extract: only train settings vary"),
    ('[sweep]\n[sweep.space]\nrun_dir = ["a", "b"]\n', r"a trial cannot vary train.run_dir"),
    ('[sweep]\n[sweep.space]\nlearning_rate = [0.1]\n', r"sweep.space.learning_rate: not a train setting"),
    ('[sweep]\n[sweep.space]\nlate_tuning = ["frozen", "bogus"]\n',
     r"sweep.space.late_tuning = 'bogus': .*is not one of"),
    ('[sweep]\n[sweep.space]\npooling = {low = 1, high = 2}\n', r"a range needs a numeric setting"),
    ('[sweep]\nsampler = "grid"\n[sweep.space]\nlr = {low = 0.001, high = 0.01}\n',
     r"sampler = 'grid' needs lists of values"),
    ('[sweep]\n[sweep.space]\nlate_layers = [1, 4]\n', r"late_layers = 4 .*the cache cannot serve it"),
    ('[sweep]\n[sweep.space]\ntiers = [[0, 7]]\n',
     r"sweep.space: train.late_layers = 1 \(not swept\) with tiers = \[0, 7\]: the cache cannot serve it"),
    ('[sweep]\nmetric = "pearson"\n[sweep.space]\nlr = [0.1]\n', r"sweep.metric = 'pearson' is not a classification"),
    ('[sweep]\ntrials = 0\n[sweep.space]\nlr = [0.1]\n', r"sweep.trials = 0 means every combination"),
    ('[sweep]\npruner = "hyperband"\n[sweep.space]\nlr = [0.1]\n', r"sweep.pruner = 'hyperband' is not one of"),
    ('[sweep]\nmetric = "accuracy"\n', r"\[sweep.space\] is missing or empty"),
])
def test_bad_sweep_files_are_refused_before_any_trial(tmp_path, bert_dir, labeled_csv, fp32_cache, table, message):
    from sherl_pipe.sweep import plan_sweep

    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, table)
    with pytest.raises(SherlError, match=message):
        plan_sweep(load_pipeline(str(path)), None, None)
    r = CliRunner().invoke(main, ["sweep", str(path), "-q"])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("table, message", [
    ('[sweep]\n[sweep.space]\nlearning_rate = [0.1]\n', r"sweep.space.learning_rate: not a train setting"),
    ('[sweep]\n[sweep.space]\nlate_layers = [1, 4]\n', r"late_layers = 4 .*the cache cannot serve it"),
    ('[sweep]\n[sweep.space]\ntiers = [[0, 7]]\n', r"tiers = \[0, 7\]: the cache cannot serve it"),
    ('[sweep]\nmetric = "pearson"\n[sweep.space]\nlr = [0.1]\n', r"sweep.metric = 'pearson' is not a classification"),
    ('[sweep]\n[sweep.space]\nlr = [0.1]\n', r"train.eval_split = 'dev': cache \S+ has no such split"),
])
def test_bad_sweep_files_are_refused_before_the_cache_is_made(tmp_path, bert_dir, labeled_csv, table, message):
    """`sherl-pipe sweep` without a cache extracts first; a bad sweep file used to be found only
    after that extraction (which on real data takes many minutes)."""
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, tmp_path / "cache", table)
    sets = ["--set", "train.eval_split=dev"] if "eval_split = 'dev'" in message else []
    r = CliRunner().invoke(main, ["sweep", str(path), "-q", *sets])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert re.search(message, r.stderr) and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "sweep").exists()


def test_a_report_on_a_sweep_whose_study_is_not_written_yet_is_one_error_line(tmp_path):
    """The sweep creates its journal a moment before it writes the study into it: a report (or the
    kill test's polling) in between got optuna's bare KeyError."""
    from sherl_pipe.engine.study import JOURNAL, load_study

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / JOURNAL).write_bytes(b"")
    with pytest.raises(SherlError, match=r"sweep folder .*sweep: study.journal holds no study yet"):
        load_study(tmp_path / "sweep")
    r = CliRunner().invoke(main, ["sweep-report", str(tmp_path / "sweep")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.output


def test_the_sweep_command_compares_the_cache_with_the_pipeline_once(tmp_path, bert_dir, labeled_csv, fp32_cache,
                                                                      monkeypatch):
    """The command checks the cache (and extracts only if it must); the sweep then skips the check."""
    import sherl_pipe.request as request
    import sherl_pipe.sweep as sweep

    reads, calls = [], []
    real_read = request.read_request
    monkeypatch.setattr(request, "read_request", lambda p: (reads.append(1), real_read(p))[1])

    def fake_run_sweep(pipe, *args, **kwargs):
        calls.append(kwargs)
        if kwargs.get("check_cache", True):
            request.check_cache_matches(__import__("sherl_pipe.cache", fromlist=["Cache"]).Cache(pipe.extract.cache),
                                        pipe)
        raise SystemExit(0)

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, GRID)
    out = CliRunner().invoke(main, ["sweep", "-q", str(path)])
    assert out.exit_code == 0, out.output
    assert "complete, matches the pipeline" in out.output
    assert calls and calls[0].get("check_cache") is False and len(reads) == 1


def test_a_sweep_ranking_trials_on_the_test_split_is_refused(tmp_path, bert_dir, labeled_csv, fp32_cache):
    """train.eval_split = evaluate.split: the test rows would rank the trials and pick each one's
    best epoch; refused in one line naming both keys, before any trial (and before any extraction)."""
    path = sweep_pipeline(tmp_path, bert_dir, labeled_csv, fp32_cache, '[sweep]\n[sweep.space]\nlr = [0.1]\n')
    for cache in (str(fp32_cache), str(tmp_path / "new-cache")):
        r = CliRunner().invoke(main, ["sweep", str(path), "-q", "--set", "train.eval_split=test",
                                      "--set", f"extract.cache={cache}"])
        one_error_line(r, "train.eval_split = 'test'", "evaluate.split", "validation split")
        assert not (tmp_path / "sweep").exists() and not (tmp_path / "new-cache").exists()
