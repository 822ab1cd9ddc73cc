"""torch.compile for the consolidation, opt-in (`train.compile = true`), with an eager fallback.

Measured by benchmarks/step.py on 2 CPU cores (MiniLM, SST-2 batches): the compiled consolidation
is no faster than the eager one and costs tens of seconds of compilation (again for new sequence
lengths), so it is off by default; on a GPU, where eager elementwise kernels are launch-bound, it
may help. Compiled code is used for training steps only: evaluation (eval mode) would compile a
second graph for a handful of batches. The compiler replaces the dropout masks' random numbers by
its own generator's, so a compiled run is not bit-identical to an eager one (resume refuses a
changed train.compile). An error of the module itself also lands in the fallback: it is said as
such, and the eager call raises it again.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class CompiledOrEager:
    """Calls torch.compile(module) in training mode. Compilation happens at the first call; if it
    fails (no C++ compiler, an operation the compiler does not support), that is said once and the
    module runs eagerly from then on. A genuine error in the module raises again from the eager call."""

    def __init__(self, module: nn.Module, log: Callable[[str], None], what: str):
        self.module, self.log, self.what = module, log, what
        try:  # torch.compile itself refuses some setups (a Python version Dynamo does not support)
            self.compiled = torch.compile(module, dynamic=True)
        except Exception as exc:  # noqa: BLE001 - fall back, and say why
            self.fall_back(exc)

    def fall_back(self, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        self.log(f"warning: the compiled {self.what} could not run ({type(exc).__name__}: {reason}); "
                 f"running it eagerly from now on (set train.compile = false to skip compiling)")
        self.compiled = None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None and self.module.training:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, and say why
                self.fall_back(exc)
        return self.module(*args, **kwargs)
