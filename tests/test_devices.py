"""The device every tensor lands on: what CUDA would break, checked on the CPU with the meta
device (a tensor left behind on the CPU shows up as 'cpu'), and run for real on CUDA when present."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import write_full_pipeline
from sherl_pipe.cache import Cache
from sherl_pipe.config import load_pipeline
from sherl_pipe.training.inference import in_storage_order
from sherl_pipe.training.setup import make_spec, source_for


def tensors(batch) -> dict:
    out = {"mask": batch.mask, "labels": batch.labels, "input_ids": batch.input_ids}
    out.update({f"h{t}": v for t, v in batch.states.items()})
    return out


def test_the_evaluation_path_runs_live_early_layers_on_the_models_device(tmp_path, bert_dir, labeled_csv,
                                                                         fp32_cache):
    """Live evaluation ran the early layers on the batch as read (CPU) and only then moved it: on
    CUDA the backbone saw CPU tensors at the first evaluation (training moved first)."""
    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                               'dtype = "float32"', 'mode = "live"')
    pipe = load_pipeline(str(path))
    cache = Cache(fp32_cache)
    spec = make_spec(pipe.train, cache.manifest)
    seen = []

    def live(batch):  # the live early route: its input must already be where the model is
        seen.append({k: v.device.type for k, v in tensors(batch).items()})
        batch.states = {t: torch.empty(batch.mask.shape + (32,), device=batch.mask.device) for t in spec.tiers}
        return batch

    batches = list(in_storage_order(source_for(cache, "validation", spec), live, 16, "meta"))
    assert seen and all(set(d.values()) == {"meta"} for d in seen), seen
    assert all(set(v.device.type for v in tensors(b).values()) == {"meta"} for b in batches)
    cached = dataclasses.replace(spec, source="cached")
    for batch in in_storage_order(source_for(cache, "validation", cached), None, 16, "meta"):
        assert {v.device.type for v in tensors(batch).values()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["live", "cached", "full-finetune"])
def test_training_with_evaluation_runs_on_cuda(tmp_path, bert_dir, labeled_csv, fp32_cache, mode):
    from sherl_pipe.evaluation import evaluate
    from sherl_pipe.training import train

    path = write_full_pipeline(tmp_path / "p.toml", bert_dir, labeled_csv, fp32_cache, tmp_path / "run",
                               'dtype = "float32"', f'mode = "{mode}"\ndevice = "cuda"\neval_split = "validation"')
    result = train(load_pipeline(str(path)), log=lambda m: None)
    assert result.best is not None and result.epochs_done == 2
    assert evaluate(tmp_path / "run", "test")["rows"] > 0
