"""One forward pass and the loss for a batch, and a model's outputs over a whole split."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from sherl_pipe.devices import autocast
from sherl_pipe.metrics import classification_metrics, regression_metrics
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.training.batches import ChunkSampler, SplitSource


def loss_fn(spec: ModelSpec, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if spec.task_type == "classification":
        return F.cross_entropy(out.float(), labels.long())
    # in the targets' sd units (see ModelSpec.target_mean): the gradients' scale, and so the
    # learning rates and gradient clipping, do not depend on the units the targets come in
    # (in float64: targets like 1,000 leave float32 a resolution of 6e-5 of their own units)
    mean, std = spec.target_mean, spec.target_std
    return F.mse_loss((out.double().squeeze(-1) - mean) / std, (labels.double() - mean) / std).float()


def in_storage_order(source: SplitSource, live, batch_size: int, device):
    """A whole split's batches in storage order, on the device (early layers run by LIVE, if given,
    on the device too: their backbone is there, as in Trainer.prepare)."""
    sampler = ChunkSampler(source.n, source.chunk_size, batch_size, 1, 0, shuffle=False)
    # two batches read ahead, not the trainer's eight: an evaluation batch (128 samples, every tier
    # read) is ~4x a training batch, and eight of them were most of a cached run's peak memory
    for batch in source.iterate(sampler.batches(0), prefetch=2):
        batch = batch.to(device)
        yield live(batch) if live is not None else batch


@torch.no_grad()
def predict_split(model, spec: ModelSpec, source: SplitSource, live, batch_size: int, device,
                  precision: str = "auto", observe=None) -> tuple:
    """(outputs, labels, positions) over a whole split in storage order, model in eval mode, under
    the autocast the run trained with (train.precision). OBSERVE(batch), if given, sees each batch
    too (the per-epoch consolidation state, measured in the evaluation's own pass)."""
    model.eval()
    outs, labels, index = [], [], []
    for batch in in_storage_order(source, live, batch_size, device):
        with autocast(device, precision):
            outs.append(model.forward_batch(batch).float().cpu())
        if observe is not None:
            observe(batch)
        labels.append(batch.labels.cpu())
        index.append(batch.index)
    return torch.cat(outs), torch.cat(labels), np.concatenate(index)


def compute_metrics(spec: ModelSpec, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
    if spec.task_type == "classification":
        return classification_metrics(outputs.argmax(-1).numpy(), labels.numpy(), spec.num_outputs)
    return regression_metrics(outputs.squeeze(-1).numpy(), labels.numpy())
