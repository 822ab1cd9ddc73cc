"""Randomness owned by a run.

Dropout (in our modules and inside transformers' layers, including the attention kernels) draws
from torch's global generator and cannot be given one of its own. So a run forks the global RNG
on entry, seeds it from the run's seed, and on exit hands the caller its generator back as it was:
whatever ran before in the process cannot change a run, and a run changes nothing after it. The
batch order uses numpy generators created from the seed and owns no global state at all.
"""

from __future__ import annotations

import contextlib

import torch


def _cuda_devices(device) -> list:
    return [torch.device(device)] if str(device).startswith("cuda") else []


@contextlib.contextmanager
def run_rng(seed: int, device):
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        torch.manual_seed(seed)
        yield


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    for d in _cuda_devices(device):
        state["cuda"] = torch.cuda.get_rng_state(d)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    for d in _cuda_devices(device):
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], d)
