"""Which device a stage runs on, and the autocast context for it."""

from __future__ import annotations

import contextlib

import torch

from sherl_pipe.errors import SherlError


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SherlError("device 'cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return name


def autocast(device):
    """bf16 autocast for stage two on CUDA; nothing on the CPU."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
