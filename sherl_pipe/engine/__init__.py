"""The trial engine: work that crosses processes, shared by `sweep` (a search) and `compare` (queued
trials). A caller owns a study in a folder and a trial function; the engine runs the study's trials
on dask workers, one trial per worker process, and keeps the study's record true through Ctrl-C,
kills and lost workers, so that a rerun resumes.

The coordinating side:

    lock = prepare_folder(folder, overwrite)          # one coordinator per folder
    repair_journal(folder, log)
    study = open_study(folder, signature(...), direction, sampler, pruner, cache_fingerprint)
    recover_interrupted(study, folder)                # trials a killed run left running: again
    with start_cluster(scheduler, model_type, workers, threads, parallel) as cluster:
        tally = Coordinator(Plan(...), study, cluster, trial_fn, progress, log, should_stop).run()

A trial function runs on a worker: `trial_fn(spec) -> {"state": ..., "values": [...], ...}`. It takes
TRIAL_LOCK, opens its spec with `open_trial(spec)` (its pipeline, the cache at one Location), sends
each epoch's value with a `Reporter(spec)` (and follows a prune decision), and stops at its next step
when `StopFlag(spec["stop"])()` turns true.

    param.py        Param: a trial parameter (a search dimension, or a fixed queued setting)
    study.py        the study on disk: lock, journal, signature, interrupted/lost/retried trials
    cluster.py      the dask cluster: local worker processes or a scheduler's, warmed up
    coordinator.py  the ask / submit / report / tell loop, Ctrl-C and lost workers
    worker.py       a trial's side: open the spec, report epochs, see the stop
"""

from sherl_pipe.engine.cluster import Cluster, start_cluster
from sherl_pipe.engine.coordinator import Coordinator, Plan, Tally
from sherl_pipe.engine.param import Param, encode
from sherl_pipe.engine.study import (finished_count, first_cause, is_rerun_error, is_sweep_folder, load_study,
                                     open_study, prepare_folder, quiet_optuna, record_error,
                                     recover_interrupted, repair_journal, retry_failed, signature, trial_dir)
from sherl_pipe.engine.worker import TRIAL_LOCK, Reporter, StopFlag, open_trial

__all__ = ["Cluster", "start_cluster", "Coordinator", "Plan", "Tally", "Param", "encode", "quiet_optuna",
           "finished_count", "first_cause",
           "is_rerun_error", "is_sweep_folder", "load_study", "open_study", "prepare_folder", "record_error",
           "recover_interrupted", "repair_journal", "retry_failed", "signature", "trial_dir", "TRIAL_LOCK",
           "Reporter", "StopFlag", "open_trial"]
