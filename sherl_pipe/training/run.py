"""Stage two: train the pipeline's method (train.method: SHERL by default) from the cache.

Every method shares the sampler, head, pooling, optimizer and loop; train.source says where the
tiers it reads come from:
  cached         read from the cache; only the pretrained modules the method declares are loaded
  live           the early layers run on the cache's input_ids on the fly (the reference for
                 equivalence and speed); the fine-tuning methods always run live

`train(pipeline)` is what `sherl-pipe train` runs; a sweep trial and a notebook call it the same
way, with their own callbacks. It sets no process-wide state: the caller sets the thread count,
and the run's randomness is forked from the global generator (see rng.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.config import Pipeline
from sherl_pipe.devices import native_cpu_bf16, pick_device, stage_two_precision
from sherl_pipe.errors import SherlError
from sherl_pipe.metrics import selection
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.request import check_cache_matches, check_phase_splits
from sherl_pipe.resources import resolve_model
from sherl_pipe.training.tier_weights import EpochProbe, dead_warning, measure_tier_weights
from sherl_pipe.training.checkpoint import RunFolder
from sherl_pipe.training.inference import compute_metrics, predict_split
from sherl_pipe.training.loop import Budget, Hooks, RunState, Trainer
from sherl_pipe.training.resume import check_resume, state_for_resume
from sherl_pipe.training.rng import rng_state, run_rng, set_rng_state
from sherl_pipe.training.setup import (build_model, build_optimizer, build_scheduler, check_splits, learning_rates,
                                       make_spec, source_for)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_done: int
    best: dict | None
    last_eval: dict | None
    seconds: float
    samples_per_s: float
    stop_reason: str | None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "early-stopping"

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"


@dataclass
class Session:
    """Everything a run trains with, built before anything is written to its folder."""

    pipeline: Pipeline
    cache: Cache
    spec: ModelSpec
    device: str
    eval_split: str | None
    model: object = None
    live: object = None
    optimizer: object = None
    scheduler: object = None
    sampler: object = None
    train_src: object = None
    eval_src: object = None
    budget: Budget | None = None
    phases: list = dataclasses.field(default_factory=list)  # the method's (Method.phases)
    data: dict = dataclasses.field(default_factory=dict)  # {split: (sampler, source)} of every phase's split


def with_target_scale(spec: ModelSpec, cache: Cache) -> ModelSpec:
    """A regression spec with its training targets' mean and sd (an sd of 0, constant targets: 1)
    and a standardizing head (see model.Head)."""
    if spec.task_type != "regression":
        return spec
    targets = np.asarray(cache.read("train", "labels"), dtype=np.float64)
    std = float(targets.std())
    return dataclasses.replace(spec, target_mean=float(targets.mean()), target_std=std if std > 0 else 1.0,
                               head_norm=True)


def open_training_cache(pipeline: Pipeline, check_cache: bool = True) -> tuple[Cache, ModelSpec, str | None]:
    """The cache, the model spec and the evaluation split, checked before any work."""
    cfg = pipeline.train
    cache = Cache(pipeline_location(pipeline, training=True))
    if check_cache:
        check_cache_matches(cache, pipeline)
    check_splits(cfg, cache.splits, f"cache {cache.path}")
    cache.require_complete("train")
    spec = with_target_scale(make_spec(cfg, cache.manifest), cache)
    selection(spec.task_type, cfg.metric)  # a metric of another task type is refused before any work
    eval_split = cfg.eval_split or None
    if eval_split is not None:
        cache.require_complete(eval_split)
    return cache, spec, eval_split


def build_session(pipeline: Pipeline, cache: Cache, spec: ModelSpec, eval_split, device: str,
                  log=print) -> Session:
    cfg = pipeline.train
    s = Session(pipeline, cache, spec, device, eval_split)
    if cfg.precision == "bf16" and device == "cpu" and not native_cpu_bf16():
        log("warning: train.precision = bf16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX): "
            "stage two may be slower than in fp32; set train.precision = \"auto\"")
    if eval_split and spec.task_type == "classification" and len(set(cache.read(eval_split, "labels").tolist())) < 2:
        log(f"warning: train.eval_split '{eval_split}' holds one class only: its accuracy cannot tell epochs apart "
            f"(MCC is 0), so the best checkpoint and early stopping mean little; give it rows of every class")
    s.model, s.live = build_model(spec, pipeline.backbone.source, cache.manifest, device)
    if cfg.compile and not spec.plugin.compile(s.model, log):
        log(f"train.compile: method {spec.method} has nothing to compile, so it runs eager")
    s.optimizer = build_optimizer(s.model, spec, cfg)
    s.train_src = source_for(cache, "train", spec, preload=cfg.preload)
    s.eval_src = source_for(cache, eval_split, spec) if eval_split else None
    s.sampler = s.train_src.sampler(cfg.batch_size, cfg.buffer_chunks, cfg.buffer_mb, cfg.seed, cfg.batching)
    s.data = {"train": (s.sampler, s.train_src)}
    s.phases = spec.plugin.phases(spec, cfg)
    check_phase_splits(spec, cfg, cache.splits, f"cache {cache.path}")
    for phase in s.phases:
        if phase.split not in s.data:
            split_source = phase_source(cache, phase, spec)
            s.data[phase.split] = (split_source.sampler(cfg.batch_size, cfg.buffer_chunks, cfg.buffer_mb, cfg.seed,
                                                        cfg.batching), split_source)
    s.budget = budget_for(cfg, s.phases, s.data)
    s.phases = phases_within(s.phases, s.budget)
    s.scheduler = build_scheduler(s.optimizer, s.budget.total_steps, cfg.warmup_ratio)
    return s


def phase_source(cache: Cache, phase, spec: ModelSpec):
    """The batches of a phase's split other than train, which the cache must hold complete."""
    cache.require_complete(phase.split)
    return source_for(cache, phase.split, spec)


def budget_for(cfg, phases: list, data: dict) -> Budget:
    """The run's steps and epochs over its phases. One phase (every method without phases of its
    own): train.max_steps, when set, decides the epochs (as it did before phases); several: the
    phases' epochs, and train.max_steps, when set, stops the run earlier."""
    per_epoch = {split: math.ceil(len(sampler) / cfg.grad_accum) for split, (sampler, _) in data.items()}
    if len(phases) == 1 and cfg.max_steps:
        epochs = math.ceil(cfg.max_steps / per_epoch[phases[0].split])
        total = cfg.max_steps
    else:
        epochs = sum(p.epochs for p in phases)
        total = cfg.max_steps or sum(per_epoch[p.split] * p.epochs for p in phases)
    if total == 0:
        raise SherlError("train.epochs = 0 and train.max_steps = 0: nothing to train; set one of them")
    return Budget(epochs=epochs, total_steps=total, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                  early_stopping=cfg.early_stopping, log_every=cfg.log_every, max_seconds=cfg.max_seconds)


def phases_within(phases: list, budget: Budget) -> list:
    """One phase: its epochs as the budget counts them (train.max_steps may ask for more)."""
    if len(phases) == 1:
        return [dataclasses.replace(phases[0], epochs=budget.epochs)]
    return phases


def start_run(run: RunFolder, s: Session) -> RunState:
    run.start_fresh()
    lr_new, lr_pre = learning_rates(s.spec, s.pipeline.train)
    model = s.model
    run.write_json("config.json", s.pipeline.to_dict())
    run.write_json("manifest.json", s.cache.manifest)
    run.write_json("model.json", {
        "spec": s.spec.to_dict(), "cache": str(s.cache.location.absolute()),
        "cache_fingerprint": manifest_fingerprint(s.cache.manifest),
        "backbone_source": s.pipeline.backbone.source,
        "backbone_folder": str(resolve_model(s.pipeline.backbone.source).resolve()),
        "label_names": s.cache.manifest["task"]["label_names"],
        "lr_new": lr_new, "lr_pretrained": lr_pre, "total_steps": s.budget.total_steps,
        "precision": stage_two_precision(s.device, s.pipeline.train.precision),  # what auto meant here
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    })
    return RunState()


def resume_run(run: RunFolder, s: Session, log) -> RunState:
    saved = run.load_state()
    check_resume(run.path, saved, s.spec, manifest_fingerprint(s.cache.manifest), s.pipeline.train, s.device)
    s.model.load_state_dict(saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"], s.device)
    state = state_for_resume(saved)
    run.truncate_metrics(state.step)
    if state.finished:
        log(f"run {run.path} already finished ({state.step} steps); nothing to resume")
    else:
        log(f"resuming {run.path} at epoch {state.epoch + 1}, batch {state.batch}, step {state.step}")
    return state


def make_hooks(run: RunFolder, s: Session, progress, log, on_epoch, should_stop) -> Hooks:
    cfg = s.pipeline.train
    last_save = [time.monotonic()]

    def save_state(state: RunState) -> None:
        run.save_weights("last", s.model)
        run.save_state({"spec": s.spec.to_dict(), "cache": manifest_fingerprint(s.cache.manifest),
                        "train": s.pipeline.to_dict()["train"], "model": s.model.state_dict(),
                        "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                        "rng": rng_state(s.device), "position": state.to_dict(),
                        "precision": stage_two_precision(s.device, cfg.precision)})
        last_save[0] = time.monotonic()

    def checkpoint_due(state: RunState) -> bool:
        by_steps = cfg.save_every and state.step % cfg.save_every == 0
        by_time = cfg.save_minutes and time.monotonic() - last_save[0] >= 60 * cfg.save_minutes
        return bool(by_steps or by_time)

    probe = EpochProbe(s.model, s.spec.plugin.consolidation(s.model), s.train_src, s.live, s.pipeline.evaluate.batch_size, s.device, s.eval_split)

    def evaluate() -> dict:
        outputs, labels, _ = predict_split(s.model, s.spec, s.eval_src, s.live, s.pipeline.evaluate.batch_size,
                                           s.device, cfg.precision, observe=probe.observer())
        return {"split": s.eval_split, **compute_metrics(s.spec, outputs, labels)}

    def on_step(state: RunState, loss: float) -> None:
        if progress is not None:
            progress(1)
            progress.set_postfix(loss=f"{state.loss_sum / max(state.loss_count, 1):.4f}", epoch=state.epoch + 1)

    return Hooks(record=run.append_metrics, save_state=save_state, save_best=lambda: run.save_weights("best", s.model),
                 evaluate=evaluate if s.eval_src is not None else None, consolidation=probe.result,
                 checkpoint_due=checkpoint_due,
                 should_stop=should_stop or (lambda: False), on_step=on_step, on_epoch=on_epoch, log=log)


def train(pipeline: Pipeline, resume: bool = False, overwrite: bool = False, progress=None, log=print,
          on_epoch: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          check_cache: bool = True, tier_weights: bool = True) -> TrainResult:
    """Train the pipeline's stage two. `on_epoch(record)` sees each epoch's record (and may raise
    loop.StopTraining); `should_stop()` is polled at step boundaries (an interrupt: the state is
    saved and the run can be resumed). check_cache=False skips comparing the cache with the
    pipeline's data, backbone and extract sections (a sweep does that once for all its trials);
    tier_weights=False skips measuring the tier weights after training (sweep trials)."""
    device = pick_device(pipeline.train.device)
    cache, spec, eval_split = open_training_cache(pipeline, check_cache)
    run = RunFolder(pipeline.train.run_dir)
    resuming = run.prepare(resume, overwrite, log)
    try:
        with run_rng(pipeline.train.seed, device):
            s = build_session(pipeline, cache, spec, eval_split, device, log)
            state = resume_run(run, s, log) if resuming else start_run(run, s)
            if progress is not None and hasattr(progress, "set_total"):
                progress.set_total(s.budget.total_steps)
                progress(state.step)
            if state.finished:  # a resumed run that had already finished: its files stay as they are
                return result_of(run, state)
            trainer = Trainer(s.model, spec, s.optimizer, s.scheduler, s.budget, device, s.live,
                              pipeline.train.precision, pipeline.train.metric, s.phases)
            state = trainer.fit(state, s.data, make_hooks(run, s, progress, log, on_epoch, should_stop))
            return finish(run, s, state, tier_weights, log)
    finally:
        run.release()


def result_of(run: RunFolder, state: RunState) -> TrainResult:
    return TrainResult(run.path, state.step, state.epoch, state.best, state.last_eval, state.seconds,
                       state.samples / state.seconds if state.seconds > 0 else 0.0, state.stop_reason)


def finish(run: RunFolder, s: Session, state: RunState, tier_weights: bool = True, log=print) -> TrainResult:
    if s.eval_src is None and state.finished:  # without evaluation the best checkpoint is the last one
        run.save_weights("best", s.model)
    result = result_of(run, state)
    if state.stop_reason == "interrupted":
        return result
    summary = {"steps": result.steps, "epochs": result.epochs_done, "best": result.best,
               "last_eval": result.last_eval, "train_seconds": round(result.seconds, 2),
               "samples_per_s": round(result.samples_per_s, 1), "stop_reason": result.stop_reason,
               "stopped_early": result.stopped_early, "consolidation": state.last_consolidation,
               "losses": state.last_losses, "loss_weights": state.loss_weights,
               "method_report": s.spec.plugin.report(s.model),
               # at the end (model.json's is at the start): SWR's search trains every candidate, then the chosen
               "trainable_parameters": sum(p.numel() for p in s.model.parameters() if p.requires_grad),
               "tier_weights": None}
    run.write_json("summary.json", summary)  # first: an interrupted measurement loses nothing else
    consolidation = s.spec.plugin.consolidation(s.model)
    warning = dead_warning(state.last_consolidation, consolidation.tier_score) if consolidation is not None else None
    if warning:
        log(warning)
    # from the cache only (live runs would rerun the early layers), and not for pruned trials
    if tier_weights and s.spec.source == "cached" and state.stop_reason != "pruned":
        summary["tier_weights"] = measure_tier_weights(s.model, consolidation, s.train_src, None,
                                                       s.pipeline.evaluate.batch_size, s.device)
        run.write_json("summary.json", summary)
    return result
