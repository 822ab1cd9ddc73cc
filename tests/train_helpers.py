"""What tests of several folders share about stage two: a pipeline for a run, its losses, and
each batch's loss and gradients from the cache and from live early layers."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import write_full_pipeline, write_pipeline
from sherl_pipe.config import load_pipeline
from sherl_pipe.extraction import extract


def pipeline_for(tmp_path, backbone, data, cache, run, train_extra="", extract_extra='dtype = "float32"'):
    path = write_full_pipeline(tmp_path / "p.toml", backbone, data, cache, run, extract_extra, train_extra)
    return load_pipeline(str(path))


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> list[float]:
    """The loss of every optimizer step (with log_every = 1)."""
    return [r["step_loss"] for r in losses(run_dir) if r["event"] == "train"]


def batch_losses_and_grads(tmp_path, backbone, data, cache, dtype_extra, modes=("cached", "live"), train_extra="",
                           batches=None):
    """Loss and gradients of every batch of one epoch (or of its first BATCHES), from the cache and
    from live early layers, with the same weights (no optimizer step, no dropout): what each source
    feeds the model."""
    from sherl_pipe.cache import Cache
    from sherl_pipe.training.inference import loss_fn
    from sherl_pipe.training.setup import build_model, make_spec, source_for

    out = {}
    for mode in modes:
        pipe = pipeline_for(tmp_path, backbone, data, cache, tmp_path / mode,
                            f'mode = "{mode}"\ndropout = 0.0\n{train_extra}', dtype_extra)
        if mode == modes[0] and not (cache / "zarr.json").exists():
            extract(pipe)
        manifest = Cache(cache).manifest
        spec = make_spec(pipe.train, manifest)
        torch.manual_seed(0)
        model, live = build_model(spec, pipe.backbone.source, manifest, "cpu")
        model.train()
        source = source_for(Cache(cache), "train", spec)
        plan = source.sampler(8, 4, 32, 0).batches(0)[:batches]
        out[mode] = []
        for batch in source.iterate(plan):
            batch = live(batch) if live is not None else batch
            model.zero_grad()
            loss = loss_fn(spec, model.forward_batch(batch), batch.labels)
            loss.backward()
            out[mode].append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    return out


def regression_pipeline(tmp_path, bert_dir, name: str, unit: float = 0.25, offset: float = 0.0, train_extra=""):
    """Scores (n words of 'good') * unit + offset: the same task in other units for other unit/offset."""
    import csv

    data = tmp_path / f"{name}.csv"
    rng = np.random.default_rng(0)
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "score"])
        for _ in range(80):
            n = int(rng.integers(1, 8))
            w.writerow([" ".join(["good"] * n + ["film"]), n * unit + offset])
    path = tmp_path / f"{name}.toml"
    write_pipeline(path, bert_dir, data, tmp_path / f"cache-{name}")
    path.write_text(path.read_text().replace('split_sizes = [0.6, 0.2, 0.2]', 'split_sizes = [0.6, 0.2, 0.2]\nlabel_column = "score"\ntask_type = "regression"')
                    + f'\n[train]\nrun_dir = "{tmp_path / f"run-{name}"}"\nlate_layers = 1\nbatch_size = 8\n{train_extra}\n')
    return load_pipeline(str(path))
