"""What a consolidation does with the cached tiers: per tier the mean of alpha over real tokens,
their sum, how far a token's alpha are from uniform and how much they vary across tokens, the
share of tokens it is alive on (relu scores only), and the anchor residual's gate.

With a relu score (the paper's: relu, relu-normed) a token is *alive* when its alpha sum to 1, i.e.
when at least one tier has a positive score; a dead token's alpha are all 0, so it passes on only
the anchor's own projection W_out relu(g). The other forms give every token positive weights by
construction, so "alive" would read 100% whatever they learned; for them (and for relu too) two
numbers tell whether the early route chooses anything:
  entropy   the mean over tokens of H(alpha) / log(number of tiers): 1 = every tier weighed alike
            (a plain average of the tiers), near 0 = one tier per token;
  token_sd  the sd of a tier's weight across tokens, averaged over the tiers: 0 = every token gets
            the same mix (a learned scalar mix, no per-token choice).
The per-epoch state (on the evaluation
split, or a fixed sample of training tokens) goes into the epoch record, the epoch line and the
summary; after training, the mean over the whole training split goes into the summary's
`tier_weights`. A tier whose mean alpha stays near 0 contributes little, so a user can drop it
from the cache (`extract.tiers`) or from training (`train.tiers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from sherl_pipe.consolidation import DEFAULT_TIER_SCORE
from sherl_pipe.training.inference import in_storage_order

if TYPE_CHECKING:  # the training package imports this module: importing it here would be a cycle
    from sherl_pipe.training.batches import SplitSource

DEAD_BELOW = 0.05  # a consolidation alive on fewer tokens than this is reported as dead
SAMPLE_CHUNKS = 4  # chunks of the training split measured per epoch when there is no evaluation split


class ConsolidationMeter:
    """Sums alpha, alive tokens and real tokens over the batches it observes (in fp32, as
    SherlModel.consolidate computes them, whatever autocast surrounds the caller)."""

    def __init__(self, consolidation):
        self.consolidation = consolidation
        self.sums = torch.zeros(len(consolidation.tiers), dtype=torch.float64)
        self.squares = torch.zeros(len(consolidation.tiers), dtype=torch.float64)
        self.entropy = 0.0  # summed over alive tokens
        self.alive = 0
        self.tokens = 0

    @torch.no_grad()
    def observe(self, batch) -> None:
        keep = batch.mask.bool()
        self.tokens += int(keep.sum())
        if not self.consolidation.tiers:
            return
        with torch.autocast(batch.mask.device.type, enabled=False):
            alpha = self.consolidation.tier_weights(batch.states, batch.mask)[keep].double()
        self.sums += alpha.sum(0).cpu()
        self.squares += alpha.square().sum(0).cpu()
        live = alpha[alpha.sum(-1) > 0]
        self.alive += len(live)
        if alpha.shape[-1] > 1 and len(live):
            p = live / live.sum(-1, keepdim=True)
            plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
            self.entropy += float((-plogp.sum(-1) / np.log(alpha.shape[-1])).sum())

    def result(self, where: str) -> dict:
        """{'alive', 'entropy', 'token_sd', 'alpha': {'h<t>': mean}, 'alpha_sum', 'gate', 'anchor',
        'tokens', 'on'}; alive is None where no token can be dead (a score without relu's dead zone,
        or no tiers besides the anchor); entropy and token_sd are None without two tiers."""
        c, n = self.consolidation, max(self.tokens, 1)
        means = (self.sums / n).tolist()
        several = len(c.tiers) > 1
        sd = (self.squares / n - (self.sums / n).square()).clamp_min(0).sqrt().mean()
        return {"alive": round(self.alive / n, 6) if c.tiers and c.form.can_die else None,
                "entropy": round(self.entropy / max(self.alive, 1), 6) if several and self.alive else None,
                "token_sd": round(float(sd), 6) if several else None,
                "alpha": {f"h{t}": round(a, 6) for t, a in zip(c.tiers, means)},
                "alpha_sum": round(sum(means), 6), "gate": round(c.gate_value(), 6),
                "anchor": f"h{c.anchor}", "tokens": self.tokens, "on": where}


@torch.no_grad()
def measure_tier_weights(model, consolidation, source: SplitSource, live, batch_size: int, device) -> dict | None:
    """The consolidation's state over every real token of SOURCE's split (the training split after
    training), or None for models without a consolidation (full fine-tuning). LIVE runs the early
    layers on each batch (None: the source reads the tiers from the cache)."""

    if consolidation is None:
        return None
    model.eval()
    meter = ConsolidationMeter(consolidation)
    for batch in in_storage_order(source, live, batch_size, device):
        meter.observe(batch)
    return meter.result(f"{source.split} split")


def sample_plan(source: SplitSource, batch_size: int) -> list[np.ndarray]:
    """A fixed sample of a split: every sample of SAMPLE_CHUNKS chunks spread evenly over it (the
    cache stores samples by length, so they run from the shortest to the longest), in batches.
    Whole chunks: the reader decodes a chunk at a time, so scattered samples would cost every chunk."""
    chunks = np.unique(np.linspace(0, source.n_chunks - 1, min(SAMPLE_CHUNKS, source.n_chunks)).round().astype(int))
    index = np.concatenate([np.arange(c * source.chunk_size, min((c + 1) * source.chunk_size, source.n))
                            for c in chunks])
    return [index[i:i + batch_size] for i in range(0, len(index), batch_size)]


class EpochProbe:
    """The consolidation's state at each epoch's end. With an evaluation split it is measured in the
    evaluation's own pass (`observer` before it, `result` after); without one, `result` measures a
    fixed sample of the training split (sample_plan)."""

    def __init__(self, model, consolidation, train_src: SplitSource, live, batch_size: int, device,
                 eval_split: str | None):
        self.model, self.consolidation, self.train_src, self.live = model, consolidation, train_src, live
        self.batch_size, self.device, self.eval_split = batch_size, device, eval_split
        self.meter: ConsolidationMeter | None = None

    def observer(self):
        """What the evaluation pass calls with each batch (None without a consolidation)."""
        if self.consolidation is None:
            return None
        self.meter = ConsolidationMeter(self.consolidation)
        return self.meter.observe

    @torch.no_grad()
    def result(self) -> dict | None:
        if self.consolidation is None:
            return None
        if self.eval_split is not None:
            meter, self.meter = self.meter, None
            return meter.result(f"{self.eval_split} split") if meter is not None else None
        self.model.eval()
        meter = ConsolidationMeter(self.consolidation)
        for batch in self.train_src.iterate(sample_plan(self.train_src, self.batch_size)):
            batch = batch.to(self.device)
            meter.observe(self.live(batch) if self.live is not None else batch)
        return meter.result("a fixed sample of the train split")


def format_tier_weights(weights: dict | None) -> str:
    if not weights:
        return "tier weights: none (measured after training from the cache; not for live or full fine-tuning runs)"
    ranked = sorted(weights["alpha"].items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{t} {a:.3f}" for t, a in ranked) or "no tiers besides the anchor"
    alive = "" if weights.get("alive") is None else f"; alive on {100 * weights['alive']:.1f}% of them"
    return (f"tier weights (mean alpha over {weights['tokens']} training tokens, largest first): {shown}{alive}"
            f"{_choice(weights)}; anchor {weights['anchor']} gate {weights['gate']:.3f}")


def _choice(state: dict) -> str:
    """'; entropy 0.93 of uniform, sd across tokens 0.041' (empty without two tiers)."""
    if state.get("entropy") is None or state.get("token_sd") is None:
        return ""
    return f"; entropy {state['entropy']:.3f} of uniform, sd across tokens {state['token_sd']:.3f}"


def format_state(state: dict) -> str:
    """The epoch line's part: 'tiers alive 97.3%, alpha sum 0.973, entropy 0.912 of uniform, sd across
    tokens 0.041, gate 0.004' (alive: relu scores only)."""
    if not state.get("alpha"):
        return f"no tiers besides the anchor, gate {state['gate']:.3f}"
    alive = "" if state.get("alive") is None else f"tiers alive {100 * state['alive']:.1f}%, "
    return f"{alive}alpha sum {state['alpha_sum']:.3f}{_choice(state)}, gate {state['gate']:.3f}"


def dead_warning(state: dict | None, tier_score: str) -> str | None:
    """One line when the consolidation was alive on fewer than DEAD_BELOW of the tokens measured at
    the last epoch: the cached tiers were then (almost) unused."""
    if not state or state.get("alive") is None or state["alive"] >= DEAD_BELOW:
        return None
    default = DEFAULT_TIER_SCORE
    fix = (f'set train.tier_score = "{default}" (the default, which has no dead zone: "{tier_score}" weighs a tier '
           f'only where its score is > 0)' if tier_score != default else "try a lower train.lr")
    return (f"warning: the consolidation is dead: its tiers are alive on {100 * state['alive']:.1f}% of the tokens "
            f"of {state['on']} (alpha sum {state['alpha_sum']:.3f}), so the cached tiers "
            f"{', '.join(state['alpha'])} are unused and this run is SHERL without its early route (the anchor "
            f"{state['anchor']} alone); {fix}")
