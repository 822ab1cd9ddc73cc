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


def uses_bf16(device, precision: str = "auto") -> bool:
    """Whether stage two runs under bf16 autocast: `train.precision` auto is bf16 on CUDA and fp32 on
    the CPU (where bf16 is fast only on CPUs with native bf16 instructions, and changes the numbers
    the defaults were chosen with); bf16 and fp32 force it either way."""
    return precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))


def stage_two_precision(device, precision: str) -> str:
    """What train.precision means on DEVICE (auto: bf16 on CUDA, fp32 on the CPU): recorded in a
    run's model.json and saved state, so evaluation and resume use what training used."""
    return "bf16" if uses_bf16(device, precision) else "fp32"


def autocast(device, precision: str = "auto"):
    """The autocast context for stage two's trainable part (the early layers always run in fp32)."""
    if uses_bf16(device, precision):
        return torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). oneDNN's own check is not it: it
    says yes for any AVX512 CPU, where bf16 is emulated."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


EARLY_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def early_autocast(device, precision: str = "fp32"):
    """The autocast the early layers run under (extract.precision): none in fp32; bf16 or fp16
    matrix products otherwise. Only the computation changes: the tiers are stored in extract.dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(str(device).split(":")[0], dtype=EARLY_DTYPES[precision])


def check_extract_precision(precision: str, device, log) -> None:
    """fp16 autocast is CUDA's (refused on the CPU); bf16 on a CPU without native bf16 runs, slowly."""
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise SherlError("extract.precision = fp16 runs on CUDA only; on the CPU use bf16 (fast where the CPU has "
                         "native bf16 instructions) or fp32")
    if precision == "bf16" and str(device) == "cpu" and not native_cpu_bf16():
        log("warning: extract.precision = bf16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX): "
            "extraction may be slower than in fp32; set extract.precision = \"fp32\"")
