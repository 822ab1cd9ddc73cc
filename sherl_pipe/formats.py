"""Tier values as the cache stores them: padding cleared, range checked, then encoded in the
storage format (`extract.dtype`). Extraction, live training and prediction all go through here,
so the values they feed stage two are the ones the cache would hold, and an overflow is always
the same error.

Formats:
  float32, float16  the values themselves.
  int8              symmetric per token: q = round(x / s) in [-127, 127] with s = max|x| / 127 over
                    the token's D values; |x - q s| <= s / 2 = max|x| / 254.
  float8            e4m3 (torch.float8_e4m3fn, 3 mantissa bits) of x / s with s = max|x| / 448 (its
                    largest value), stored as its bytes: |x - decoded| <= |x| / 16, or s / 1024 for
                    the smallest values (e4m3's subnormals).
The lossy formats store each token's scale s (float32, in the machine's byte order: little-endian
on every platform torch builds for) as 4 extra bytes after its D codes, so a tier array is
(N, T, D + 4) of int8 or uint8 and every chunk holds its own scales: the cache's layout, chunking,
checksums and readers are the same for every format.
"""

from __future__ import annotations

import numpy as np
import torch

from sherl_pipe.errors import SherlError

FP16_MAX = 65504.0  # the largest finite float16: a value beyond it is refused, not stored as inf

LOSSY = {"int8": (torch.int8, 127.0), "float8": (torch.uint8, 448.0)}  # stored dtype, largest code
SCALE_BYTES = 4


def stored_dtype(fmt: str) -> str:
    """The numpy dtype of a tier array in this format."""
    return {"int8": "int8", "float8": "uint8"}.get(fmt, fmt)


def stored_width(width: int, fmt: str) -> int:
    return width + SCALE_BYTES if fmt in LOSSY else width


def nominal_itemsize(fmt: str) -> int:
    """Bytes per value used to size the reader's windows: the lossy formats count as float16, so
    their batches are the float16 cache's batches for a seed (formats compare on the same data)."""
    return 4 if fmt == "float32" else 2


def clear_padding(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero at padded positions. masked_fill, not a product: inf * 0 would be NaN."""
    return h.masked_fill(~mask.bool().unsqueeze(-1), 0.0)


def check_range(h: torch.Tensor, fmt: str, where: str, tier: int) -> None:
    if fmt == "float16":
        peak = float(h.abs().amax()) if h.numel() else 0.0
        if not peak <= FP16_MAX:  # also catches NaN
            raise SherlError(f"{where}: tier h[{tier}] has values up to {peak:g}, beyond float16's range; "
                             f"set extract.dtype = 'float32' (and re-extract)")
    elif not bool(torch.isfinite(h).all()):
        raise SherlError(f"{where}: tier h[{tier}] has non-finite values; the backbone's weights are broken")


def encode(h: torch.Tensor, fmt: str) -> torch.Tensor:
    """(..., D) float values -> the stored tensor: (..., D) of the format's dtype, or, for the lossy
    formats, (..., D + 4) codes followed by the token's float32 scale as bytes."""
    if fmt not in LOSSY:
        return h.to(getattr(torch, fmt))
    dtype, top = LOSSY[fmt]
    scaled, scale = _scaled(h, top)
    if fmt == "int8":
        codes = scaled.round().clamp(-top, top).to(torch.int8)
    else:
        codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([codes, scale.contiguous().view(dtype)], dim=-1)


def _scaled(h: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A lossy format's values before rounding (each token's largest |x| at TOP), and the scales."""
    h = h.float()
    scale = h.abs().amax(-1, keepdim=True) / top
    return torch.where(scale > 0, h / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0), scale


def rounded(h: torch.Tensor, mask: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 values the cache would hold for these states (padding zero, rounded to FMT),
    computed without the stored layout's byte views, so that an exported graph can hold it; equal
    to decode(encode(...)): a lossy format's scale is kept exactly (float32 bytes)."""
    h = clear_padding(h, mask)
    if fmt not in LOSSY:
        return h.to(getattr(torch, fmt)).float()
    top = LOSSY[fmt][1]
    scaled, scale = _scaled(h, top)
    codes = scaled.round().clamp(-top, top) if fmt == "int8" else scaled.to(torch.float8_e4m3fn).float()
    return codes * scale


def decode(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """The stored tensor -> float32 values (..., D)."""
    if fmt not in LOSSY:
        return stored.float()
    codes, scale = stored[..., :-SCALE_BYTES], stored[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    values = codes.float() if fmt == "int8" else codes.view(torch.float8_e4m3fn).float()
    return values * scale


def decode_numpy(stored: np.ndarray, fmt: str) -> np.ndarray:
    return decode(torch.from_numpy(np.ascontiguousarray(stored)), fmt).numpy()


def to_storage(h: torch.Tensor, mask: torch.Tensor, fmt: str, where: str, tier: int) -> torch.Tensor:
    """A tier as stored: padding zero, range checked, encoded in FMT."""
    if fmt == "float16":
        return _to_float16(h, mask, where, tier)
    h = clear_padding(h, mask)
    check_range(h, fmt, where, tier)
    return encode(h, fmt)


def _to_float16(h: torch.Tensor, mask: torch.Tensor, where: str, tier: int) -> torch.Tensor:
    """The default format in two passes over the tier instead of four (this runs for every tier of
    every batch of an extraction, beside the forward pass): convert, clear padding in place, then
    check the range on the converted values, where anything beyond float16's range became inf
    (values within half a step of the largest float16 round to it, as any conversion would)."""
    out = h.to(torch.float16, copy=True)  # never the caller's tensor, cleared in place below
    out.masked_fill_(~mask.bool().unsqueeze(-1), 0.0)
    if out.numel():
        lo, hi = torch.aminmax(out)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):  # NaN too; the message gives the float32 peak
            check_range(clear_padding(h, mask).float(), "float16", where, tier)
    return out


def through_storage(h: torch.Tensor, mask: torch.Tensor, fmt: str, where: str, tier: int) -> torch.Tensor:
    """The float32 values stage two would read back from the cache for these states."""
    return decode(to_storage(h, mask, fmt, where, tier), fmt)
