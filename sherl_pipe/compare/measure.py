"""What a compare trial measures about memory: the training process's peak resident memory above
its idle baseline, and the bytes of the training state at a stated batch.

The peak is the kernel's high-water mark (VmHWM), reset when training starts (writing 5 to
/proc/self/clear_refs) so that what loading torch and the data took before does not count; the
baseline is the resident memory at that moment. Each trial runs in a process of its own (job.py),
so no earlier trial's memory is counted either. The state's bytes are counted, not sampled:
parameters and buffers, gradients and AdamW's two moments of the trainable parameters, and the
tensors autograd saves for the backward pass of one batch (each storage once; the parameters' and
buffers' own storages, which autograd saves too, are counted under parameters only).
"""

from __future__ import annotations

import os
from pathlib import Path

MIB = 2**20


def _status(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mib() -> float | None:
    return _status("VmRSS")


def peak_mib() -> float | None:
    return _status("VmHWM")


def reset_peak() -> bool:
    """Start the high-water mark again from the current resident memory (Linux 4.0+)."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model, batch_forward) -> dict:
    """Bytes of the training state: parameters (with buffers), gradients and AdamW's moments of the
    trainable ones, and the activations autograd saves for one batch (BATCH_FORWARD() runs its
    forward pass and returns the loss)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    # autograd saves a Linear's weight (trained or frozen) for its input's gradient: that storage
    # is already counted under parameters, so it is no activation
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in owned:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = batch_forward()
    del loss
    params = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    grads = tensor_bytes(trainable)
    return {"parameters": params, "gradients": grads, "optimizer": 2 * grads, "activations": sum(saved.values()),
            "total": params + 2 * grads + grads + sum(saved.values())}
