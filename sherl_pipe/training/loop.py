"""The training loop: optimizer steps over an epoch's batches, evaluation when an epoch ends, and
hooks through which the caller checkpoints, shows progress, and stops or prunes a run.

The loop knows nothing of files or the command line. Everything a resumed run needs to continue
exactly as an uninterrupted one (position, running loss, best result, patience) is in `RunState`;
the caller saves it with the model, optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from sherl_pipe.devices import autocast
from sherl_pipe.errors import SherlError
from sherl_pipe.metrics import is_better, selection
from sherl_pipe.methods.base import Phase
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.training.tier_weights import format_state
from sherl_pipe.training.inference import loss_fn


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    batch: int = 0  # the next batch of epoch `epoch` (always at an optimizer-step boundary)
    step: int = 0  # optimizer steps done
    samples: int = 0
    seconds: float = 0.0  # training time so far, across resumes
    loss_sum: float = 0.0  # the current epoch's loss, summed over its samples so far
    loss_count: int = 0
    term_sums: dict = field(default_factory=dict)  # the method's loss terms (Method.losses), summed likewise
    last_losses: dict | None = None  # the last epoch's means of the task's loss and each term
    loss_weights: dict | None = None  # each term's weight in the objective
    best: dict | None = None  # {"epoch", "step", metrics...} of the best evaluation
    bad_epochs: int = 0  # evaluations since the best one
    last_eval: dict | None = None
    last_consolidation: dict | None = None  # the consolidation's state at the last epoch (tier_weights.py)
    finished: bool = False
    stop_reason: str | None = None  # early-stopping | max-steps | max-seconds | a caller's reason (e.g. pruned)
    eval_seconds: float = 0.0  # the last evaluation's time: what a wall-clock stop keeps in reserve

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(**d)


@dataclass(frozen=True)
class Budget:
    epochs: int
    total_steps: int
    grad_accum: int
    grad_clip: float
    early_stopping: int
    log_every: int
    max_seconds: float = 0.0  # > 0: a wall-clock stop (train.max_seconds)


class StopTraining(Exception):
    """Raised by an epoch callback to end the run after this epoch (a sweep prunes a trial so)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Hooks:
    """What the loop calls out to. All optional except where noted."""

    record: Callable[[dict], None] = lambda r: None  # a metrics record (train or epoch)
    save_state: Callable[["RunState"], None] = lambda s: None  # a resumable checkpoint at a step boundary
    save_best: Callable[[], None] = lambda: None  # the current weights are the best so far
    evaluate: Callable[[], dict] | None = None  # metrics on the evaluation split
    consolidation: Callable[[], dict | None] | None = None  # its state after evaluate (tier_weights.EpochProbe)
    checkpoint_due: Callable[["RunState"], bool] = lambda s: False  # time or step policy
    should_stop: Callable[[], bool] = lambda: False  # an interrupt was requested
    on_step: Callable[["RunState", float], None] = lambda s, loss: None  # progress display
    on_epoch: Callable[[dict], None] | None = None  # the caller's epoch callback; may raise StopTraining
    log: Callable[[str], None] = lambda m: None
    clock: Callable[[], float] = field(default=time.perf_counter)


def phase_at(phases: list[Phase], epoch: int) -> tuple[int, Phase]:
    """The phase epoch EPOCH (0-based, over the whole run) belongs to, with its index; past the last
    phase's end: the last."""
    end = 0
    for i, phase in enumerate(phases):
        end += phase.epochs
        if epoch < end:
            return i, phase
    return len(phases) - 1, phases[-1]


def step_groups(plan: list[np.ndarray], start: int, grad_accum: int) -> list[list[int]]:
    """Batches [start, ...) of an epoch in optimizer steps of `grad_accum` batches (the last may be short)."""
    return [list(range(b, min(b + grad_accum, len(plan)))) for b in range(start, len(plan), grad_accum)]


class Trainer:
    """Runs the loop for one model over its method's phases (one by default); a phase's batches
    come from `source.iterate(index arrays)` of its split's (sampler, source) in DATA."""

    def __init__(self, model, spec: ModelSpec, optimizer, scheduler, budget: Budget, device, live=None,
                 precision: str = "auto", metric: str = "", phases: list[Phase] | None = None):
        self.model, self.spec, self.optimizer, self.scheduler = model, spec, optimizer, scheduler
        self.budget, self.device, self.live, self.precision = budget, device, live, precision
        self.metric, self.direction = selection(spec.task_type, metric)  # train.metric
        self.method = spec.plugin
        self.phases = phases or [Phase("train", budget.epochs)]
        self.phase = self.phases[0]

    def prepare(self, batch):
        """On the device first, then the live early route (which runs where its backbone is)."""
        batch = batch.to(self.device)
        return self.live(batch) if self.live is not None else batch

    def optimizer_step(self, batches: list, state: RunState) -> float:
        """One step over micro-batches, each weighted by its share of the step's samples, so a step
        of several batches equals one step on their union (a short last step included; a regression
        head's running statistics count each micro-batch as a batch, see model.Head)."""
        total = sum(len(b.index) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            loss, terms, weights = self.objective(batch)
            value = float(loss.detach())
            if not math.isfinite(value):  # before backward: the weights stay as the last step left them
                raise SherlError(f"train loss is {value} at step {state.step + 1} (epoch {state.epoch + 1}): "
                                 f"training diverged; lower train.lr (or train.lr_late), or check the labels' "
                                 f"scale; the run folder keeps its last checkpoint")
            (loss * (len(batch.index) / total)).backward()
            loss_sum += value * len(batch.index)
            for name, term in terms.items():
                state.term_sums[name] = state.term_sums.get(name, 0.0) + term * len(batch.index)
            state.loss_weights = weights or None
        if self.budget.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.budget.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples += total
        state.loss_sum += loss_sum
        state.loss_count += total
        return loss_sum / total

    def objective(self, batch) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """The loss the step minimises on BATCH: the task's (in a supervised phase) + each of the
        method's terms times its weight; the values to log (the task's, each term's: none when
        the method adds no term); and the terms' weights."""
        with autocast(self.device, self.precision):
            out = self.model.forward_batch(batch) if self.phase.supervised else None
            terms = self.method.losses(self.model, batch, out, self.phase)
        logged = {}
        loss = None
        if out is not None:
            loss = loss_fn(self.spec, out, batch.labels)
            logged["task"] = float(loss.detach())
        for name, (weight, value) in terms.items():
            value = value.float()
            logged[name] = float(value.detach())
            loss = weight * value if loss is None else loss + weight * value
        if loss is None:
            raise SherlError(f"method {self.spec.method}: phase {self.phase.name!r} has neither the task's loss "
                             f"nor a term of the method's own (Method.losses returned none)")
        return loss, (logged if terms else {}), {name: float(weight) for name, (weight, _) in terms.items()}

    def elapsed(self, state: RunState, hooks: Hooks) -> float:
        return self._seconds_before + hooks.clock() - self._clock_start

    def out_of_time(self, state: RunState, hooks: Hooks) -> bool:
        """Whether another step would leave no time for the evaluation that ends the run: the last
        evaluation's time is kept in reserve, with one step's time as measured so far."""
        if not self.budget.max_seconds or state.step == 0:
            return False
        taken = state.step - self._steps_before
        step = (hooks.clock() - self._clock_start) / taken if taken > 0 else 0.0
        return self.elapsed(state, hooks) + state.eval_seconds + step > self.budget.max_seconds

    def run_epoch(self, state: RunState, source, plan: list[np.ndarray], hooks: Hooks) -> str | None:
        """Steps from state.batch to the epoch's end; returns None, 'max-steps', 'max-seconds' or
        'interrupted'."""
        self.model.train()
        groups = step_groups(plan, state.batch, self.budget.grad_accum)
        batches = source.iterate(plan[state.batch:])
        with contextlib.closing(batches):
            for group in groups:
                step_loss = self.optimizer_step([self.prepare(next(batches)) for _ in group], state)
                state.batch = group[-1] + 1
                hooks.on_step(state, step_loss)
                if state.step % self.budget.log_every == 0:
                    hooks.record({"event": "train", "epoch": state.epoch + 1, "step": state.step,
                                  "loss": state.loss_sum / state.loss_count, "step_loss": step_loss,
                                  "lr": self.scheduler.get_last_lr()[0]})
                if state.step >= self.budget.total_steps:
                    return "max-steps" if state.batch < len(plan) else None
                if state.batch < len(plan) and self.out_of_time(state, hooks):
                    return "max-seconds"
                if hooks.should_stop():
                    return "interrupted"
                if state.batch < len(plan) and hooks.checkpoint_due(state):
                    self.save(state, hooks)
        return None

    def end_epoch(self, state: RunState, complete: bool, hooks: Hooks) -> dict:
        """Evaluate, keep the best weights, and write the epoch's record."""
        record = {"event": "epoch", "epoch": state.epoch + 1, "step": state.step, "complete": complete,
                  "train_loss": state.loss_sum / max(state.loss_count, 1)}
        if len(self.phases) > 1:
            record["phase"] = self.phase.name
        state.last_losses = ({k: v / max(state.loss_count, 1) for k, v in state.term_sums.items()}
                             if state.term_sums else None)  # this epoch's: None where it had no term
        if state.last_losses:
            record["losses"] = state.last_losses
            record["loss_weights"] = dict(state.loss_weights or {})
        if hooks.evaluate is not None and self.phase.supervised:
            started = hooks.clock()
            state.last_eval = hooks.evaluate()
            state.eval_seconds = hooks.clock() - started
            record["eval"] = state.last_eval
            value = self.selected(record)
            if is_better(value, self.selected(state.best) if state.best else None, self.direction):
                state.best = {"epoch": state.epoch + 1, "step": state.step, **state.last_eval}
                if self.metric == "train_loss":
                    state.best["train_loss"] = record["train_loss"]
                state.bad_epochs = 0
                hooks.save_best()
            else:
                state.bad_epochs += 1
        if hooks.consolidation is not None:
            state.last_consolidation = hooks.consolidation()
            if state.last_consolidation is not None:
                record["consolidation"] = state.last_consolidation
        hooks.record(record)
        return record

    def selected(self, record: dict) -> float:
        """The train.metric value of an epoch record (or of a best record, which holds its eval)."""
        if self.metric == "train_loss":
            return record["train_loss"]
        return (record["eval"] if "eval" in record else record)[self.metric]

    def save(self, state: RunState, hooks: Hooks) -> None:
        state.seconds = self._seconds_before + hooks.clock() - self._clock_start
        hooks.save_state(state)

    def fit(self, state: RunState, data: dict, hooks: Hooks) -> RunState:
        """Train until the budget is spent, early stopping, a caller's stop, or an interrupt. DATA:
        {split: (sampler, source)} for every phase's split."""
        self._clock_start, self._seconds_before, self._steps_before = hooks.clock(), state.seconds, state.step
        entered = None
        while not state.finished:
            index, self.phase = phase_at(self.phases, state.epoch)
            if index != entered:  # a phase starts (or a resumed run is inside it)
                self.method.enter_phase(self.model, self.phase)
                entered = index
            sampler, source = data[self.phase.split]
            plan = sampler.batches(state.epoch)
            outcome = self.run_epoch(state, source, plan, hooks)
            if outcome == "interrupted":
                self.save(state, hooks)
                state.stop_reason = "interrupted"
                return state
            self.finish_epoch(state, outcome, hooks)
            self.save(state, hooks)  # the saved state is the final one: its time is the run's time
        return state

    def finish_epoch(self, state: RunState, outcome: str | None, hooks: Hooks) -> None:
        """OUTCOME: run_epoch's (None: the epoch completed)."""
        complete = outcome is None
        record = self.end_epoch(state, complete, hooks)
        if complete:
            state.epoch, state.batch = state.epoch + 1, 0
        state.loss_sum, state.loss_count, state.term_sums = 0.0, 0, {}
        self.log_epoch(record, state, hooks)
        if not complete or state.step >= self.budget.total_steps or state.epoch >= self.budget.epochs:
            state.finished, state.stop_reason = True, outcome
        elif self.out_of_time(state, hooks):  # not even one more step fits
            state.finished, state.stop_reason = True, "max-seconds"
            hooks.log(f"train.max_seconds = {self.budget.max_seconds:g}: no time for another epoch")
        elif self.phase.supervised and self.budget.early_stopping and state.bad_epochs >= self.budget.early_stopping:
            state.finished, state.stop_reason = True, "early-stopping"
            hooks.log(f"early stopping: no {self.metric} improvement for {self.budget.early_stopping} epoch(s)")
        if hooks.on_epoch is not None and self.phase.supervised:  # (a caller ranks epochs by their evaluation)
            try:
                # final: no epoch follows; seconds: the run's training time so far (a time budget's calibration)
                hooks.on_epoch({**record, "final": state.finished, "seconds": self.elapsed(state, hooks)})
            except StopTraining as stop:
                state.finished, state.stop_reason = True, stop.reason

    def log_epoch(self, record: dict, state: RunState, hooks: Hooks) -> None:
        where = f"epoch {record['epoch']}" + ("" if record["complete"] else f" (stopped at step {state.step})")
        where += f" ({record['phase']})" if "phase" in record else ""
        line = f"{where}: train loss {record['train_loss']:.4f}"
        if "eval" in record:
            ev, best = record["eval"], state.best
            shown = "" if self.metric == "train_loss" else f", {ev['split']} {self.metric} {ev[self.metric]:.4f}"
            line += shown + (f" (best {self.metric} {self.selected(best):.4f} at epoch {best['epoch']})" if best
                             else " (no finite value yet)")
        if "losses" in record:
            line += "; " + ", ".join(f"{k} {v:.4f}" for k, v in record["losses"].items())
        if "consolidation" in record:
            line += f"; {format_state(record['consolidation'])}"
        hooks.log(line)
