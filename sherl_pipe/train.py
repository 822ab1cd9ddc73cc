"""Stage two: train SHERL (consolidation + late layers + head) from the cache.

Three modes share the sampler, head, pooling, optimizer and loop:
  cached         tiers read from the cache; only the late layers' (and pooler's) weights are loaded
  live           the same model, with the early layers run on the cache's input_ids on the fly
                 (the reference for equivalence and speed)
  full-finetune  the whole backbone trained from the cache's input_ids (the accuracy reference)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sherl_pipe.backbone import Backbone, family_of, load_module, module_hash
from sherl_pipe.cache import Cache, manifest_fingerprint
from sherl_pipe.checkpoint import (append_jsonl, atomic_write_json, prepare_run_dir, save_state, save_weights,
                                   truncate_metrics)
from sherl_pipe.config import Pipeline
from sherl_pipe.errors import SherlError
from sherl_pipe.extract import pick_device
from sherl_pipe.loader import ChunkSampler, LiveStates, SplitSource
from sherl_pipe.metrics import PRIMARY, classification_metrics, regression_metrics
from sherl_pipe.model import (FULL_FT_LR, LATE_LR, NEW_LR, FullFinetuneModel, ModelSpec, build_sherl_model,
                              config_from_manifest, parameter_groups, resolve_pooling)
from sherl_pipe.resources import resolve_model

LOG_EVERY = 10  # optimizer steps between train-loss records


def make_spec(pipeline: Pipeline, manifest: dict) -> ModelSpec:
    cfg = pipeline.train
    num_layers = manifest["backbone"]["num_layers"]
    anchor = num_layers - cfg.late_layers
    stored = manifest["tiers"]
    if cfg.mode != "full-finetune":
        if anchor < 0 or anchor not in stored:
            raise SherlError(f"train.late_layers = {cfg.late_layers}: its anchor h[{anchor}] is not in the cache "
                             f"(stored tiers {stored}); choose late_layers with L - k in the stored tiers, or "
                             f"re-extract with extract.late_layers = {cfg.late_layers}")
        tiers = list(cfg.tiers) if cfg.tiers else [t for t in stored if t < anchor]
        bad = [t for t in tiers if t not in stored or t > anchor]
        if bad:
            raise SherlError(f"train.tiers: tier {bad[0]} is not a stored tier at or below the anchor h[{anchor}] "
                             f"(stored: {stored})")
        tiers = sorted(set(tiers) - {anchor})
    else:
        tiers = []
    task = manifest["task"]
    return ModelSpec(
        mode=cfg.mode, task_type=task["type"],
        num_outputs=len(task["label_names"]) if task["type"] == "classification" else 1,
        num_layers=num_layers, late_layers=cfg.late_layers, tiers=tuple(tiers),
        pooling=resolve_pooling(cfg.pooling, manifest), projection=cfg.projection, reduction=cfg.reduction,
        dropout=cfg.dropout, late_tuning=cfg.late_tuning if cfg.mode != "full-finetune" else "full",
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)


def verified_module(folder: Path, config, manifest: dict, name: str) -> nn.Module:
    """One pretrained module loaded from the backbone folder, checked against the cache's hash."""
    expected = manifest["backbone"]["module_hashes"].get(name)
    if expected is None:
        raise SherlError(f"cache manifest has no hash for backbone module '{name}'; re-extract the cache")
    module = load_module(folder, config, family_of(config.model_type), name)
    if module_hash(module) != expected:
        raise SherlError(f"backbone {folder}: module '{name}' differs from the one the cache was made with "
                         f"(hash mismatch); use the backbone the cache was extracted from, or re-extract")
    return module


def verify_backbone(backbone: Backbone, manifest: dict, names: list[str]) -> None:
    got = backbone.module_hashes()
    bad = [n for n in names if got.get(n) != manifest["backbone"]["module_hashes"].get(n)]
    if bad:
        raise SherlError(f"backbone {backbone.folder}: module(s) {', '.join(bad)} differ from the ones the cache "
                         f"was made with (hash mismatch); use the backbone the cache was extracted from")


def build_model(spec: ModelSpec, pipeline: Pipeline, manifest: dict, device: str):
    """(model, live early-route or None). Loads only what the mode needs from the backbone folder."""
    if spec.mode == "full-finetune":
        backbone = Backbone(pipeline.backbone.source, manifest["backbone"]["attn_implementation"], "cpu")
        verify_backbone(backbone, manifest, list(manifest["backbone"]["module_hashes"]))
        return FullFinetuneModel(spec, backbone.model).to(device), None
    config = config_from_manifest(manifest)
    folder = resolve_model(pipeline.backbone.source)
    late = [verified_module(folder, config, manifest, f"layer.{i}") for i in range(spec.anchor, spec.num_layers)]
    pooler = verified_module(folder, config, manifest, "pooler") if spec.pooling == "cls-pooler" else None
    model = build_sherl_model(spec, config, late, pooler).to(device)
    live = None
    if spec.mode == "live":
        backbone = Backbone(pipeline.backbone.source, manifest["backbone"]["attn_implementation"], device)
        verify_backbone(backbone, manifest, ["embeddings"] + [f"layer.{i}" for i in range(spec.anchor)])
        live = LiveStates(backbone, list(spec.tiers) + [spec.anchor], manifest["dtype"])
    return model, live


def forward(model, spec: ModelSpec, batch):
    if spec.mode == "full-finetune":
        return model(batch.input_ids, batch.mask, batch.token_type_ids)
    return model(batch.states, batch.mask)


def loss_fn(spec: ModelSpec, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if spec.task_type == "classification":
        return F.cross_entropy(out.float(), labels.long())
    return F.mse_loss(out.float().squeeze(-1), labels.float())


def source_for(cache: Cache, split: str, spec: ModelSpec, preload: bool = False) -> SplitSource:
    read = spec.mode == "cached"
    return SplitSource(cache, split, list(spec.tiers) + [spec.anchor], read_tiers=read, preload=preload)


@torch.no_grad()
def predict_split(model, spec: ModelSpec, source: SplitSource, live, batch_size: int, device) -> tuple:
    """(outputs, labels, positions) over a whole split in storage order, model in eval mode."""
    model.eval()
    sampler = ChunkSampler(source.n, source.chunk_size, batch_size, 1, 0, shuffle=False)
    outs, labels, index = [], [], []
    for batch in source.iterate(sampler.batches(0)):
        if live is not None:
            batch = live(batch)
        batch = batch.to(device)
        with autocast(device):
            outs.append(forward(model, spec, batch).float().cpu())
        labels.append(batch.labels.cpu())
        index.append(batch.index)
    return torch.cat(outs), torch.cat(labels), np.concatenate(index)


def compute_metrics(spec: ModelSpec, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
    if spec.task_type == "classification":
        return classification_metrics(outputs.argmax(-1).numpy(), labels.numpy(), spec.num_outputs)
    return regression_metrics(outputs.squeeze(-1).numpy(), labels.numpy())


def autocast(device):
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def learning_rates(spec: ModelSpec, cfg) -> tuple[float, float]:
    lr_new = cfg.lr or NEW_LR
    if spec.mode == "full-finetune":
        return lr_new, cfg.lr_late or FULL_FT_LR
    return lr_new, cfg.lr_late or LATE_LR[spec.late_tuning]


def warmup_linear(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    epochs_done: int
    best: dict | None
    last_eval: dict | None
    seconds: float
    samples_per_s: float
    stopped_early: bool


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(pipeline: Pipeline, resume: bool = False, overwrite: bool = False, progress=None,
          log=print) -> TrainResult:
    cfg = pipeline.train
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    cache = Cache(pipeline.extract.cache)
    manifest = cache.manifest
    if "train" not in cache.splits:
        raise SherlError(f"cache {cache.path}: has no 'train' split (has: {', '.join(cache.splits)})")
    cache.require_complete("train")
    fingerprint = manifest_fingerprint(manifest)
    eval_split = cfg.eval_split if cfg.eval_split in cache.splits else None
    if cfg.eval_split and eval_split is None:
        log(f"note: train.eval_split '{cfg.eval_split}' is not in the cache; no per-epoch evaluation")
    spec = make_spec(pipeline, manifest)
    run_dir = Path(cfg.run_dir)
    resuming = prepare_run_dir(run_dir, resume, overwrite)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, live = build_model(spec, pipeline, manifest, device)
    lr_new, lr_pre = learning_rates(spec, cfg)
    groups = parameter_groups(model, lr_new, lr_pre, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr_new)

    train_src = source_for(cache, "train", spec, preload=cfg.preload)
    eval_src = source_for(cache, eval_split, spec) if eval_split else None
    sampler = train_src.sampler(cfg.batch_size, cfg.buffer_chunks, cfg.buffer_mb, cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    if total_steps == 0:
        raise SherlError("train.epochs = 0 and train.max_steps = 0: nothing to train; set one of them")
    epochs = cfg.epochs if not cfg.max_steps else math.ceil(cfg.max_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(total_steps, int(cfg.warmup_ratio * total_steps)))

    metrics_path = run_dir / "metrics.jsonl"
    primary = PRIMARY[spec.task_type]
    pos = {"epoch": 0, "batch": 0, "step": 0, "best": None, "bad_epochs": 0, "samples": 0, "seconds": 0.0}
    if resuming:
        state = torch.load(run_dir / "checkpoints" / "state.pt", map_location="cpu", weights_only=False)
        if state["spec"] != spec.to_dict() or state["cache"] != fingerprint:
            raise SherlError(f"run folder {run_dir}: its saved state is for another model or cache than this "
                             f"pipeline describes; use --overwrite to start again")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        pos = state["position"]
        truncate_metrics(metrics_path, pos["step"])
        log(f"resuming {run_dir} at epoch {pos['epoch'] + 1}, batch {pos['batch']}, step {pos['step']}")
    else:
        atomic_write_json(run_dir / "config.json", pipeline.to_dict())
        atomic_write_json(run_dir / "model.json", {
            "spec": spec.to_dict(), "cache": str(cache.path), "cache_fingerprint": fingerprint,
            "backbone_source": pipeline.backbone.source, "label_names": manifest["task"]["label_names"],
            "lr_new": lr_new, "lr_pretrained": lr_pre, "total_steps": total_steps,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()),
        })

    def save_last(next_epoch: int, next_batch: int) -> None:
        pos.update(epoch=next_epoch, batch=next_batch, seconds=seconds_before + time.perf_counter() - t_run)
        save_weights(run_dir / "checkpoints" / "last.safetensors", model)
        save_state(run_dir / "checkpoints" / "state.pt", {
            "spec": spec.to_dict(), "cache": fingerprint, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
            "position": dict(pos)})

    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(total_steps)
        progress(pos["step"])
    stopped_early, last_eval = False, None
    t_run, seconds_before = time.perf_counter(), pos["seconds"]
    epoch = pos["epoch"]
    while epoch < epochs and pos["step"] < total_steps:
        batches = sampler.batches(epoch)
        model.train()
        running, count, t_log, n_log = 0.0, 0, time.perf_counter(), 0
        step_samples = 0
        micro = 0
        for b, batch in enumerate(train_src.iterate(batches[pos["batch"]:]), start=pos["batch"]):
            if live is not None:
                batch = live(batch)
            batch = batch.to(device)
            with autocast(device):
                out = forward(model, spec, batch)
            loss = loss_fn(spec, out, batch.labels)
            (loss / cfg.grad_accum).backward()
            running += float(loss.detach()) * len(batch.index)
            count += len(batch.index)
            n_log += len(batch.index)
            step_samples += len(batch.index)
            micro += 1
            if micro < cfg.grad_accum and b + 1 < len(batches):
                continue
            micro = 0
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos["step"] += 1
            pos["samples"] += step_samples
            step_samples = 0
            if progress is not None:
                progress(1)
                rate = pos["samples"] / max(seconds_before + time.perf_counter() - t_run, 1e-9)
                progress.set_postfix(loss=f"{running / count:.4f}", epoch=epoch + 1, samples_s=f"{rate:.0f}")
            if pos["step"] % LOG_EVERY == 0:
                dt = time.perf_counter() - t_log
                append_jsonl(metrics_path, {"event": "train", "epoch": epoch + 1, "step": pos["step"],
                                            "loss": running / count, "lr": scheduler.get_last_lr()[0],
                                            "samples_per_s": n_log / dt if dt > 0 else None})
                t_log, n_log = time.perf_counter(), 0
            if cfg.save_every and pos["step"] % cfg.save_every == 0 and b + 1 < len(batches):
                save_last(epoch, b + 1)
            if pos["step"] >= total_steps:
                break
        epoch += 1
        pos["batch"] = 0
        record = {"event": "epoch", "epoch": epoch, "step": pos["step"], "train_loss": running / max(count, 1)}
        if eval_src is not None:
            outputs, labels, _ = predict_split(model, spec, eval_src, live, pipeline.evaluate.batch_size, device)
            last_eval = {"split": eval_split, **compute_metrics(spec, outputs, labels)}
            record["eval"] = last_eval
            if pos["best"] is None or last_eval[primary] > pos["best"][primary]:
                pos["best"] = {"epoch": epoch, "step": pos["step"], **last_eval}
                pos["bad_epochs"] = 0
                save_weights(run_dir / "checkpoints" / "best.safetensors", model)
            else:
                pos["bad_epochs"] += 1
            log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, {eval_split} {primary} "
                f"{last_eval[primary]:.4f} (best {pos['best'][primary]:.4f} at epoch {pos['best']['epoch']})")
        else:
            log(f"epoch {epoch}: train loss {record['train_loss']:.4f}")
        append_jsonl(metrics_path, record)
        stopped_early = bool(cfg.early_stopping and pos["bad_epochs"] >= cfg.early_stopping)
        save_last(epoch, 0)
        if stopped_early:
            log(f"early stopping: no {primary} improvement on {eval_split} for {cfg.early_stopping} epoch(s)")
            break
    seconds = seconds_before + time.perf_counter() - t_run
    if eval_src is None:  # without evaluation the best checkpoint is the last one
        save_weights(run_dir / "checkpoints" / "best.safetensors", model)
    result = TrainResult(run_dir, pos["step"], epoch, pos["best"], last_eval, seconds,
                         pos["samples"] / seconds if seconds > 0 else 0.0, stopped_early)
    atomic_write_json(run_dir / "summary.json", {
        "steps": result.steps, "epochs": result.epochs_done, "best": result.best, "last_eval": last_eval,
        "train_seconds": round(seconds, 2), "samples_per_s": round(result.samples_per_s, 1),
        "stopped_early": stopped_early})
    return result
