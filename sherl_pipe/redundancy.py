"""Barlow Twins' redundancy reduction (Zbontar et al., ICML 2021): the cross-correlation matrix of
two views' embeddings, each dimension standardised along the batch, driven to the identity.

    C = z1ᵀ z2 / N        (z: (N, D), each column standardised over the batch: the official
                           code's BatchNorm1d without affine parameters)
    L = [ Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij² ] / D

The diagonal asks the two views to agree (invariance), the off-diagonal asks the dimensions to
carry different information (redundancy reduction). λ = 0.0051 is the official code's default.
Departures: no projector network (the embedding is the one the method trains: SHERL's
consolidation output, pooled), and the sum is divided by D so that one weight suits any width.
"""

from __future__ import annotations

import dataclasses

import torch

VIEW_DROPOUT = 0.1  # each view's dropout on the cached tiers: Barlow Twins' distortion of its input
LAMBDA = 0.0051  # the official code's lambd
EPS = 1e-5  # BatchNorm1d's


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """The objective above for two (N, D) views of one batch; 0 for a batch of one row (its
    cross-correlation is undefined: a last batch may be that small)."""
    n, d = z1.shape
    if n < 2:
        return z1.sum() * 0.0  # keeps the graph: a step whose only term this is still backpropagates
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + EPS)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + EPS)
    c = a.T @ b / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return (on + lam * off) / d


def distorted(batch):
    """A view of BATCH: its tiers (in fp32) through dropout of VIEW_DROPOUT; the model's own dropout,
    in training mode, distorts each view further."""
    states = {t: torch.nn.functional.dropout(h.float(), VIEW_DROPOUT, training=True) for t, h in batch.states.items()}
    return dataclasses.replace(batch, states=states)
