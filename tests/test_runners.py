"""The library runs what the commands run (runners.py): from Python, `run`, `run_sweep` and
`run_compare` extract where the cache is missing, then go on as the command line does (old code:
"extract if needed" lived in the CLI, so a notebook's sweep or comparison refused a missing cache)."""

from __future__ import annotations

import pytest


import sherl_pipe
from conftest import write_full_pipeline
from sherl_pipe.runners import Hooks


def quiet(stages: list | None = None) -> Hooks:
    return Hooks(log=lambda m: None, say=lambda m: None,
                 on_stage=(lambda name, value: stages.append((name, value))) if stages is not None else
                 (lambda name, value: None))


def test_run_from_python_extracts_trains_evaluates_and_then_reuses_the_cache(tmp_path, bert_dir, labeled_csv):
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "cache", tmp_path / "run",
                               'dtype = "float32"', 'eval_split = "validation"\nmax_steps = 4')
    stages: list = []
    out = sherl_pipe.run(str(path), hooks=quiet(stages))
    assert [name for name, _ in stages] == ["extract", "train"]
    assert out.extract.samples > 0 and not out.train.interrupted and out.train.steps == 4
    assert out.metrics == sherl_pipe.evaluate(out.train.run_dir, "test")  # evaluate.split's, as `run` prints
    again = sherl_pipe.run(str(path), overwrite=True, hooks=quiet())  # the run folder replaced, the cache reused
    assert again.extract.already_complete and again.metrics == out.metrics


@pytest.mark.slow
def test_a_sweep_from_python_makes_its_cache_first(tmp_path, bert_dir, labeled_csv):
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "cache", tmp_path / "run",
                               'dtype = "float32"', 'eval_split = "validation"\nmax_steps = 2')
    path.write_text(path.read_text() + f'\n[sweep]\nsampler = "grid"\nworkers = 1\nthreads = 1\n'
                                       f'dir = "{tmp_path / "sweep"}"\n[sweep.space]\nlr = [0.001, 0.003]\n')
    stages: list = []
    result = sherl_pipe.run_sweep(str(path), hooks=quiet(stages))
    assert stages[0][0] == "extract" and stages[0][1].samples > 0  # extracted, not refused
    assert [r["state"] for r in result.report.rows] == ["complete", "complete"]
    stages.clear()
    sherl_pipe.run_sweep(str(path), hooks=quiet(stages))  # resumed: the cache was ready, nothing extracted
    assert stages == [("extract", None)]


def test_a_comparison_from_python_makes_its_cache_and_leaves_out_what_it_cannot_serve(tmp_path, bert_dir,
                                                                                      labeled_csv, monkeypatch):
    """No methods named: every registered one the cache serves (a cache that stops below the last
    tier serves no probe, UniPT or LST), the others named in one line; then the comparison runs on
    the cache just made (its trials are compare's own tests' business: faked here)."""
    import sherl_pipe.compare as compare_module

    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "cache", tmp_path / "run",
                               'dtype = "float32"\nlate_layers = 1', 'eval_split = "validation"')
    asked = []

    def fake_compare(pipe, names, *args, **kwargs):
        asked.append((list(names), kwargs["check_cache"]))
        return {"interrupted": False, "markdown": "| table |", "folder": tmp_path / "cmp"}

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    said: list = []
    out = sherl_pipe.run_compare(str(path), hooks=Hooks(log=lambda m: None, say=said.append), seeds=1,
                                 compare_dir=str(tmp_path / "cmp"))
    assert out["markdown"] == "| table |" and (tmp_path / "cache" / "zarr.json").is_file()
    # checked once, before extracting; SHERL at both presets (the accuracy preset reads h[0] and h[1])
    assert asked == [(["sherl", "sherl:preset=accuracy", "swr", "lora-finetune", "full-finetune"], False)]
    # (a method another test registered may be left out too, after these)
    assert [line for line in said if line.startswith("compare: left out unipt, lst, linear-probe, scalar-mix")], said
