"""Tier values as the cache stores them: padding cleared, then rounded to the storage dtype with
a range check. Extraction, live training and prediction all go through here, so the values they
feed stage two are the ones the cache would hold, and an overflow is always the same error."""

from __future__ import annotations

import torch

from sherl_pipe.cache import FP16_MAX
from sherl_pipe.errors import SherlError


def clear_padding(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero at padded positions. masked_fill, not a product: inf * 0 would be NaN."""
    return h.masked_fill(~mask.bool().unsqueeze(-1), 0.0)


def check_range(h: torch.Tensor, dtype: str, where: str, tier: int) -> None:
    if dtype == "float16":
        peak = float(h.abs().amax()) if h.numel() else 0.0
        if not peak <= FP16_MAX:  # also catches NaN
            raise SherlError(f"{where}: tier h[{tier}] has values up to {peak:g}, beyond float16's range; "
                             f"set extract.dtype = 'float32' (and re-extract)")
    elif not bool(torch.isfinite(h).all()):
        raise SherlError(f"{where}: tier h[{tier}] has non-finite values; the backbone's weights are broken")


def to_storage(h: torch.Tensor, mask: torch.Tensor, dtype: str, where: str, tier: int) -> torch.Tensor:
    """A tier as stored: padding zero, range checked, rounded to DTYPE (returned in that dtype)."""
    h = clear_padding(h, mask)
    check_range(h, dtype, where, tier)
    return h.to(getattr(torch, dtype))
