"""BERT (and BERT-architecture checkpoints such as MiniLM): the interface's defaults."""

from sherl_pipe.families.base import Family


class Bert(Family):
    model_type = "bert"


ADAPTER = Bert()
