"""Which cached tiers a trained consolidation leans on: the mean of alpha per tier over the real
tokens of a split (the training split after training), and the anchor residual's gate. A tier
whose mean alpha stays near 0 contributes little, so a user can drop it from the cache
(`extract.tiers`) or from training (`train.tiers`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the training package imports this module: importing it here would be a cycle
    from sherl_pipe.training.batches import SplitSource


@torch.no_grad()
def measure_tier_weights(model, source: SplitSource, live, batch_size: int, device) -> dict | None:
    """{'alpha': {'h<t>': mean alpha}, 'gate': tanh(gamma/T), 'anchor': 'h<c>', 'tokens': n}, or None
    for models without a consolidation (full fine-tuning). LIVE runs the early layers on each batch
    (None: the source reads the tiers from the cache)."""
    from sherl_pipe.training.inference import in_storage_order

    consolidation = getattr(model, "consolidation", None)
    if consolidation is None:
        return None
    model.eval()
    sums = torch.zeros(len(consolidation.tiers), dtype=torch.float64)
    tokens = 0
    for batch in in_storage_order(source, live, batch_size, device) if consolidation.tiers else ():
        alpha = consolidation.tier_weights(batch.states, batch.mask)  # fp32, as in SherlModel.consolidate
        sums += alpha[batch.mask.bool()].double().sum(0).cpu()
        tokens += int(batch.mask.sum())
    means = (sums / max(tokens, 1)).tolist()
    return {"alpha": {f"h{t}": round(a, 6) for t, a in zip(consolidation.tiers, means)},
            "gate": round(consolidation.gate_value(), 6), "anchor": f"h{consolidation.anchor}", "tokens": tokens}


def format_tier_weights(weights: dict | None) -> str:
    if not weights:
        return "tier weights: none (measured after training from the cache; not for live or full fine-tuning runs)"
    ranked = sorted(weights["alpha"].items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{t} {a:.3f}" for t, a in ranked) or "no tiers besides the anchor"
    return (f"tier weights (mean alpha over {weights['tokens']} training tokens, largest first): {shown}; "
            f"anchor {weights['anchor']} gate {weights['gate']:.3f}")
