"""What a resumed run must agree on with the run it continues.

A resume continues exactly where the saved state stopped, so everything that shapes the run
must be the same: the model, the cache, and every training setting except those that only say
where or how fast it runs. Changing `epochs` or `max_steps` cannot be continued exactly: the
learning-rate schedule (warm-up, then linear decay to zero at the last step) was laid out over
the original number of steps from step 1, so a longer run would have had other rates all along.
"""

from __future__ import annotations

from pathlib import Path

from sherl_pipe.config import TrainConfig, section_to_dict, upgrade_saved
from sherl_pipe.methods import LEGACY_MODES, effective_train, get_method, option_owners
from sherl_pipe.devices import stage_two_precision
from sherl_pipe.errors import SherlError
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.training.loop import RunState

# Settings that do not change what is computed: where the run lives and how it is checkpointed,
# how many threads and which device run it, how the cache's store is reached, whether the split
# is read ahead into memory, logging.
# Not `compile`: the compiler draws the consolidation's dropout masks from its own generator.
FREE_ON_RESUME = {"run_dir", "threads", "device", "preload", "save_every", "save_minutes", "log_every",
                  "storage_options"}


def check_resume(run_dir: Path, saved: dict, spec: ModelSpec, fingerprint: str, cfg: TrainConfig,
                 device: str) -> None:
    if saved.get("cache") != fingerprint:
        raise SherlError(f"run folder {run_dir}: was trained from another cache than extract.cache "
                         f"(its manifest fingerprint differs); resume with the cache it was trained on")
    # a key the run's version of sherl-pipe did not have yet was at its default there
    old = effective_train(upgrade_saved({"train": saved.get("train", {})})["train"])
    new = effective_train(section_to_dict(cfg))
    # the precision that was in effect must stay (auto on another device is another one); states saved
    # before it was recorded compare train.precision as it was written
    was, now = saved.get("precision"), stage_two_precision(device, cfg.precision)
    if was is not None and was != now:
        raise SherlError(f"run folder {run_dir}: stage two ran in {was}; this resume would run it in {now} "
                         f"(train.precision = {cfg.precision} on {device}); set train.precision = {was} to "
                         f"continue it exactly")
    free = FREE_ON_RESUME | ({"precision"} if was is not None else set())
    changed = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
    budget = [k for k in changed if k in ("epochs", "max_steps")]
    if budget and budget == changed:
        shown = ", ".join(f"train.{k} {old.get(k)} -> {new.get(k)}" for k in budget)
        raise SherlError(f"run folder {run_dir}: cannot resume with {shown}: the learning-rate schedule was "
                         f"laid out over the original number of steps from step 1, so a longer or shorter run "
                         f"cannot continue this one exactly; start a new run (another train.run_dir or "
                         f"--overwrite) with the new setting")
    if changed:
        shown = "; ".join(f"train.{k}: run has {old.get(k)!r}, request has {new.get(k)!r}" for k in changed[:6])
        raise SherlError(f"run folder {run_dir}: the training settings differ from the run being resumed "
                         f"({shown}); resume with the run's settings (see its config.json), or start a new "
                         f"run with --overwrite or another train.run_dir")
    check_same_model(run_dir, saved.get("spec") or {}, spec.to_dict())


# Keys a regression spec gained as its head changed (target scaling, then a standardized input)
REGRESSION_HEAD_KEYS = {"target_mean", "target_std", "head_norm"}


def check_same_model(run_dir, old: dict, new: dict) -> None:
    if "mode" in old:  # saved before methods existed
        old = {**{k: v for k, v in old.items() if k != "mode"}, **dict(zip(("method", "source"),
                                                                           LEGACY_MODES[old["mode"]]))}
    if old.get("method") == new.get("method"):  # saved before methods owned their settings: every method's keys
        others = set(option_owners()) - set(get_method(new["method"]).Options.keys())  # never read by this model
        old = {k: v for k, v in old.items() if k not in others}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not changed:
        return
    if set(changed) <= REGRESSION_HEAD_KEYS and not set(changed) & set(old):
        raise SherlError(f"run folder {run_dir}: saved by an earlier sherl-pipe, whose regression head had no "
                         f"{' / '.join(k for k in changed)}: it cannot be resumed by this version (evaluate and "
                         f"predict still work); use --overwrite to train it again")
    shown = "; ".join(f"{k}: run has {old.get(k)!r}, request has {new.get(k)!r}" for k in changed[:6])
    raise SherlError(f"run folder {run_dir}: its saved state is for another model than this pipeline "
                     f"describes ({shown}); use --overwrite to start again")


def state_for_resume(saved: dict) -> RunState:
    return RunState.from_dict(saved["position"])
