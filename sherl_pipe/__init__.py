"""sherl-pipe: SHERL transfer learning as a two-stage feature-caching pipeline.

The Python API (see api.py and README): `sherl_pipe.load_pipeline`, `extract`, `train`, `run`,
`run_sweep`, `run_compare`, `evaluate`, `predict`, `predict_file`, `verify`, and `StopTraining`. They are imported on first
use, so `import sherl_pipe` (and the command line) starts without loading torch.
"""

from sherl_pipe.version import __version__

_API = ("load_pipeline", "extract", "train", "run", "run_sweep", "run_compare", "evaluate", "predict", "predict_file",
        "verify")
__all__ = [*_API, "StopTraining", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from sherl_pipe import api  # loaded when first used: `import sherl_pipe` loads no torch

        return getattr(api, name)
    if name == "StopTraining":
        from sherl_pipe.training.loop import StopTraining  # loaded when first used: `import sherl_pipe` loads no torch

        return StopTraining
    raise AttributeError(f"module 'sherl_pipe' has no attribute {name!r}")
