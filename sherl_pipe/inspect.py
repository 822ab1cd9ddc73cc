"""`sherl-pipe info`: what a cache holds, how big it is and whether it is complete; for a run
folder, what was trained and which tiers its consolidation leans on."""

from __future__ import annotations

import json
from pathlib import Path

from sherl_pipe.cache import Cache, is_tier_name
from sherl_pipe.errors import SherlError
from sherl_pipe.formats import LOSSY
from sherl_pipe.consolidation import PAPER_TIER_SCORE
from sherl_pipe.training.tier_weights import dead_warning, format_state, format_tier_weights
from sherl_pipe.cache.location import is_url
from sherl_pipe.methods.spec import ModelSpec


def _array_order(item) -> tuple:
    name = item[0]
    return (0, int(name[1:])) if is_tier_name(name) else (1, name)


def cache_report(path: str) -> dict:
    cache = Cache(path)
    m = cache.manifest
    splits = {}
    for name in cache.splits:
        done, total = cache.blocks_done(name)
        missing = sum(len(c) for c in cache.missing_chunks(name).values())
        info = m["splits"][name]
        arrays = {}
        for arr_name, arr in sorted(cache.group[name].arrays(), key=_array_order):
            arrays[arr_name] = {"shape": list(arr.shape), "chunks": list(arr.chunks), "dtype": str(arr.dtype),
                                "bytes_on_disk": cache.bytes_on_disk(name, arr_name)}
        tier_bytes = sum(a["bytes_on_disk"] for n, a in arrays.items() if is_tier_name(n))
        real_fp16 = info["tokens"] * m["backbone"]["hidden_size"] * 2 * len(m["tiers"])
        tokens = max(info["tokens"], 1)
        per_token = {n: round(a["bytes_on_disk"] / tokens, 1) for n, a in arrays.items() if is_tier_name(n)}
        splits[name] = {**info, "blocks_done": done, "missing_chunks": missing,
                        "complete": done == total and not missing, "arrays": arrays,
                        "tier_bytes_per_real_token": per_token, "tier_bytes_on_disk": tier_bytes,
                        "tier_bytes_over_real_fp16": round(tier_bytes / real_fp16, 4) if real_fp16 else None}
    return {
        "path": str(cache.path),
        "complete": all(s["complete"] for s in splits.values()),
        "bytes_on_disk": cache.bytes_on_disk(),
        "manifest": {k: v for k, v in m.items() if k != "splits"},
        "splits": splits,
    }


def format_report(r: dict) -> str:
    m = r["manifest"]
    b = m["backbone"]
    damaged = any(s["missing_chunks"] for s in r["splits"].values())
    state = "complete" if r["complete"] else ("DAMAGED" if damaged else "INCOMPLETE")
    lines = [
        f"cache      {r['path']}  ({state}, {r['bytes_on_disk'] / 2**20:.1f} MiB; checksums are checked by "
        f"`sherl-pipe verify`)",
        f"format     v{m['format_version']} (made by sherl-pipe {m['tool_version']} on {m['created']})",
        f"backbone   {b['source']}: {b['model_type']}, {b['num_layers']} layers, width {b['hidden_size']}, "
        f"{b['attn_implementation']} attention",
        f"tokenizer  {m['tokenizer']['class']} max_length {m['tokenizer']['max_length']} "
        f"(hash {m['tokenizer']['hash'][:12]})",
        f"cut        c = {m['cut']} (late layers {m['late_layers']}); tiers {m['tiers']}; early layers computed "
        f"in {m.get('precision', 'fp32')}",
        f"storage    {m['dtype']}{' (lossy: codes + a float32 scale per token)' if m['dtype'] in LOSSY else ''}, codec {m['codec']['name']} level {m['codec']['level']}, "
        f"{m['chunk_size']} samples per chunk",
        f"task       {m['task']['type']}: text '{m['task']['text_column']}'"
        + (f" + '{m['task']['text_pair_column']}'" if m['task']['text_pair_column'] else "")
        + f", label '{m['task']['label_column']}'"
        + (f", classes {m['task']['label_names']}" if m['task']['label_names'] else ""),
    ]
    for name, s in r["splits"].items():
        state = "complete" if s["complete"] else "INCOMPLETE"
        if s["missing_chunks"]:
            state = f"DAMAGED: {s['missing_chunks']} chunk(s) missing; run `sherl-pipe verify --mark-bad`"
        lines.append(f"split {name}: {s['rows']} rows, {s['tokens']} tokens (longest {s['max_len']}), "
                     f"{s['blocks_done']}/{s['blocks']} blocks ({state}); tiers on disk "
                     f"{s['tier_bytes_on_disk'] / 2**20:.2f} MiB = {s['tier_bytes_over_real_fp16']}x raw fp16 of real tokens")
        lines.append(f"  source {s['source']} (rows fingerprint {s['fingerprint'][:12]})")
        lines.append("  bytes per real token: " + ", ".join(f"{n} {b:g}" for n, b in s["tier_bytes_per_real_token"].items()))
        for arr_name, a in s["arrays"].items():
            lines.append(f"  {arr_name:<15} {str(tuple(a['shape'])):<18} {a['dtype']:<8} chunks "
                         f"{str(tuple(a['chunks'])):<16} {a['bytes_on_disk'] / 2**20:8.2f} MiB")
    return "\n".join(lines)


def is_run_folder(path: str) -> bool:
    return (Path(path) / "model.json").is_file()


def folder_kind(path: str) -> str:
    """'run' or 'cache', for `info`; anything else is refused naming both. A URL is a cache (run
    folders are always local)."""

    if is_url(path):
        return "cache"
    if is_run_folder(path):
        return "run"
    if (Path(path) / "zarr.json").is_file() or Path(path).is_file():  # a file: the cache check names it
        return "cache"
    what = "neither a cache (no zarr.json) nor a run folder (no model.json)" if Path(path).exists() else "not found"
    raise SherlError(f"{path}: {what}; give a cache (made by `extract` or `run`) or a run folder (made by `train`, "
                     f"`run` or a sweep trial)")


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def run_report(path: str) -> dict:
    """A run folder's model, its training summary (with the learned tier weights) and its cache."""
    folder = Path(path)
    try:
        info = json.loads((folder / "model.json").read_text())
        summary, config = (json.loads((folder / name).read_text()) if (folder / name).is_file() else None
                           for name in ("summary.json", "config.json"))
    except (OSError, ValueError) as exc:
        raise SherlError(f"run folder {folder}: cannot read model.json, summary.json or config.json ({exc}); "
                         f"the folder is damaged") from None
    return {"path": str(folder), "spec": info.get("spec", {}), "cache": info.get("cache"),
            "backbone": info.get("backbone_source"), "summary": summary,
            "precision": ((config or {}).get("train") or {}).get("precision", "auto"),
            "precision_in_effect": info.get("precision")}


def precision_shown(setting: str, in_effect: str | None) -> str:
    """'auto (fp32)': the setting and, where it says less, what it meant (runs before it was recorded: the setting)."""
    return setting if in_effect in (None, setting) else f"{setting} ({in_effect})"


def format_best(best: dict | None) -> str:
    """'best accuracy 0.8050, mcc 0.6701 on validation at epoch 3 (step 375)', or why there is none."""
    if not best:
        return "no evaluation recorded (train.eval_split empty, or none finished)"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k not in ("epoch", "step", "split"))
    return f"best {metrics} on {best.get('split')} at epoch {best.get('epoch')} (step {best.get('step')})"


def model_line(spec: dict) -> str:
    """'sherl from the cache: late layers 2 (frozen), tiers [0, 1] + anchor h[4]', as the method says."""

    parsed = ModelSpec.from_dict(spec)  # runs from before methods existed say `mode`
    where = "from the cache" if parsed.source == "cached" else "live"
    return f"{parsed.method} {where}: {parsed.plugin.summary(parsed)}"


def format_run_report(r: dict) -> str:
    spec, summary = r["spec"], r["summary"]
    lines = [f"run        {r['path']}",
             f"model      {model_line(spec)}, pooling {spec.get('pooling')}, precision "
             f"{precision_shown(r.get('precision', 'auto'), r.get('precision_in_effect'))}",
             f"cache      {r['cache']}  backbone {r['backbone']}"]
    if summary is None:
        lines.append("summary    none yet (the run has not finished)")
        return "\n".join(lines)
    lines.append(f"training   {summary['steps']} steps, {counted(summary['epochs'], 'epoch')}, "
                 f"{summary['stop_reason'] or 'finished'}; {format_best(summary.get('best'))}")
    if summary.get("losses"):
        lines.append(f"losses     {format_losses(summary['losses'], summary.get('loss_weights') or {})}")
    lines.extend(ModelSpec.from_dict(spec).plugin.report_lines(summary.get("method_report")))
    lines.extend(consolidation_lines(summary.get("consolidation"), spec.get("tier_score", PAPER_TIER_SCORE)))
    lines.append(format_tier_weights(summary.get("tier_weights")))
    return "\n".join(lines)


def format_losses(losses: dict, weights: dict) -> str:
    """'task 0.3120, barlow 41.2 (weight 0.005)': the last epoch's mean of each term of the objective."""
    return ", ".join(f"{k} {v:.4f}" + (f" (weight {weights[k]:g})" if k in weights else "")
                     for k, v in losses.items()) + " (last epoch's means)"


def consolidation_lines(state: dict | None, tier_score: str) -> list[str]:
    """The last epoch's consolidation state (and the dead-consolidation warning), for runs that have one."""
    if not state:
        return []
    per_tier = ", ".join(f"{t} {a:.3f}" for t, a in state["alpha"].items())
    line = (f"consolidation (tier score {tier_score}; last epoch, {state['tokens']} tokens of {state['on']}): "
            f"{format_state(state)}" + (f"; mean alpha {per_tier}" if per_tier else ""))
    warning = dead_warning(state, tier_score)
    return [line] + ([warning] if warning else [])
