"""The Python API a notebook uses: the same functions as the CLI, nothing process-wide changed."""

from __future__ import annotations

import sys

import pytest

from conftest import write_full_pipeline


def test_a_notebook_session(tmp_path, bert_dir, labeled_csv):
    import sherl_pipe

    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, tmp_path / "cache", tmp_path / "run",
                               'dtype = "float32"', 'epochs = 4\neval_split = "validation"')
    pipe = sherl_pipe.load_pipeline(str(path), ["train.lr=0.003"])
    assert pipe.train.lr == 0.003
    summary = sherl_pipe.extract(pipe, log=lambda m: None)
    assert summary.samples == 200 and not summary.resumed
    seen = []

    def on_epoch(record):
        seen.append(record)
        if record["epoch"] == 2:
            raise sherl_pipe.StopTraining("enough")

    result = sherl_pipe.train(pipe, on_epoch=on_epoch, log=lambda m: None)
    assert [r["epoch"] for r in seen] == [1, 2] and all("eval" in r for r in seen)
    assert result.stop_reason == "enough" and result.epochs_done == 2
    metrics = sherl_pipe.evaluate(result.run_dir, "test")
    assert metrics["rows"] == 40 and 0 <= metrics["accuracy"] <= 1
    out = sherl_pipe.predict(result.run_dir, ["good film", "bad plot and a boring actor"])
    assert [set(r) for r in out] == [{"label", "prob_neg", "prob_pos"}] * 2
    assert all(abs(r["prob_neg"] + r["prob_pos"] - 1) < 1e-6 for r in out)
    assert sherl_pipe.verify(tmp_path / "cache").ok
    # overrides on a loaded pipeline, as --set does
    changed = sherl_pipe.api._pipeline(pipe, ["train.epochs=1"])
    assert changed.train.epochs == 1 and pipe.train.epochs == 4


def test_importing_the_package_loads_no_torch():
    import subprocess

    code = "import sherl_pipe, sys; assert 'torch' not in sys.modules; print(sherl_pipe.__version__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_an_unknown_attribute_is_an_attribute_error():
    import sherl_pipe

    with pytest.raises(AttributeError):
        sherl_pipe.nonesuch  # noqa: B018
