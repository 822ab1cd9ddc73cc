"""SWR (Kim et al., ICASSP 2023): a policy chooses which of the backbone's weight tensors to
reparametrize under train.swr_budget, trained jointly with the reparametrization in a search
phase, then the chosen ones are fine-tuned and merged into the weights (reparametrization.py).

The method `swr` runs the whole backbone live, as LoRA does; SHERL uses the same options and
phases for its late layers with train.late_tuning = "swr" (methods/sherl.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from sherl_pipe.errors import SherlError
from sherl_pipe.families import family_of
from sherl_pipe.fields import at_least, between
from sherl_pipe.methods.base import Options, Phase
from sherl_pipe.methods.finetune import FinetuneModel, FullFinetune
from sherl_pipe.reparametrization import Reparametrization, candidate_units, layer_weights

SEARCH = "search"
SWR_LR = 1e-4  # train.lr_late = 0: the rate of the chosen units' dW


@dataclass(frozen=True)
class SwrOptions(Options):
    """SWR's settings: [train] keys (shared with SHERL's late_tuning = "swr"), or a [train.swr] table."""

    swr_budget: float = between(0.1, 1e-6, 1.0)  # the share of the backbone's layer weights that may be updated
    swr_search_share: float = between(0.3, 0.0, 1.0, below_max=True)  # of train.epochs, the policy's search
    swr_policy_lr: float = at_least(1e-2, 0.0)  # the policy network's rate
    swr_budget_weight: float = at_least(1.0, 0.0)  # the budget penalty's weight during the search


def swr_phases(phases: list[Phase], options: SwrOptions) -> list[Phase]:
    """PHASES (a method's usual, ending with the task's) with the task's epochs split: the search
    first (at least one epoch), then the chosen units' fine-tuning (at least one)."""
    *before, task = phases
    search = max(1, round(options.swr_search_share * task.epochs))
    if task.epochs < 2:
        raise SherlError(f"train.epochs = {task.epochs}: SWR needs at least 2, one to search for the units "
                         f"to reparametrize (train.swr_search_share of them) and one to fine-tune them")
    return [*before, dataclasses.replace(task, name=SEARCH, epochs=min(search, task.epochs - 1)),
            dataclasses.replace(task, epochs=task.epochs - min(search, task.epochs - 1))]


def enter_swr_phase(reparam: Reparametrization, phase: Phase) -> None:
    if phase.name == SEARCH:
        reparam.search()
    elif phase.supervised:
        reparam.fix()
    else:  # a warm-up before the search: SWR waits for the task
        reparam.off()


def swr_losses(reparam: Reparametrization, options: SwrOptions, phase: Phase) -> dict:
    return {"swr-budget": (options.swr_budget_weight, reparam.budget_penalty())} if phase.name == SEARCH else {}


def policy_group(reparam: Reparametrization, options: SwrOptions) -> list[dict]:
    return [{"name": "swr-policy", "params": list(reparam.policy.parameters()), "lr": options.swr_policy_lr,
             "weight_decay": 0.0}]


def reparametrize(layers, first: int, num_layers: int, family, options: SwrOptions) -> Reparametrization:
    """SWR over LAYERS (the backbone's layers FIRST...), its budget a share of all NUM_LAYERS'."""
    units = candidate_units(layers, first, family.lora_targets)
    if not units:
        raise SherlError(f"SWR: the {family.model_type} layers have no Linear named as the family's LoRA targets "
                         f"({', '.join(family.lora_targets)}) to reparametrize")
    total = layer_weights(layers[0], family.lora_targets) * num_layers
    return Reparametrization(units, num_layers, int(options.swr_budget * total), total)


def report_lines(report: dict | None) -> list[str]:
    """`info`'s lines for a run's SWR choice."""
    if not report:
        return []
    share = report["updated_weights"] / max(report["backbone_weights"], 1)
    budget = report["budget_weights"] / max(report["backbone_weights"], 1)
    when = "" if report["final"] else " (the search had not ended: its projection)"
    return [f"swr        {len(report['units'])} of {report['candidates']} units reparametrized{when}: "
            f"{report['updated_weights']:,} weights, {share:.1%} of the backbone's layer weights (budget "
            f"{budget:.1%})",
            f"           {', '.join(report['units']) or 'none'}"]


class Swr(FullFinetune):
    name = "swr"
    Options = SwrOptions
    trains = "the weight tensors a policy chooses under swr_budget (merged after training) + head"
    source_text = "Kim et al., ICASSP 2023 (our reading: docs/methods.md)"

    def lr_pretrained(self, spec, cfg) -> float:
        return SWR_LR

    def build(self, spec, config, modules: dict[str, nn.Module]) -> nn.Module:
        return SwrModel(spec, modules["backbone"])

    def phases(self, spec, cfg) -> list[Phase]:
        return swr_phases(super().phases(spec, cfg), spec.options)

    def enter_phase(self, model, phase: Phase) -> None:
        enter_swr_phase(model.reparam, phase)

    def losses(self, model, batch, outputs, phase: Phase) -> dict:
        return swr_losses(model.reparam, model.spec.options, phase)

    def parameter_groups(self, model, spec, cfg) -> list[dict]:
        return policy_group(model.reparam, spec.options)

    def for_inference(self, model) -> None:
        model.merge()

    def report(self, model) -> dict | None:
        return model.reparam.report() if model.reparam is not None else None

    def report_lines(self, report: dict | None) -> list[str]:
        return report_lines(report)


class SwrModel(FinetuneModel):
    """The whole backbone with SWR on every layer's units, the head as the other methods'."""

    def __init__(self, spec, backbone_model: nn.Module):
        super().__init__(spec, backbone_model)
        backbone_model.requires_grad_(False)
        family = family_of(backbone_model.config.model_type)
        layers = family.layers(backbone_model)
        self.reparam = reparametrize(layers, 0, len(layers), family, spec.options)

    def forward(self, input_ids, mask, token_type_ids=None):
        if self.reparam is not None:
            self.reparam.draw(self.training)
        return super().forward(input_ids, mask, token_type_ids)

    def merge(self) -> None:
        """The chosen units merged into the weights and the policy dropped: the backbone's own
        modules and parameter count, and its inference cost."""
        if self.reparam is not None:
            self.reparam.merge()
            self.reparam = None
