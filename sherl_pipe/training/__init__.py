"""Stage two: training from the cache.

    setup.py       model spec, model, optimizer and schedule
    batches.py     the sampler and the batch sources (cache reader, preloaded, live)
    loop.py        the training loop and its hooks (RunState, Trainer, StopTraining)
    inference.py   forward, loss, outputs and metrics over a split
    checkpoint.py  run folders
    resume.py      what a resume must agree on
    rng.py         randomness owned by a run
    run.py         train(pipeline): the whole run, as `sherl-pipe train` does it
"""

from sherl_pipe.training.loop import StopTraining
from sherl_pipe.training.run import TrainResult, train

__all__ = ["StopTraining", "TrainResult", "train"]
