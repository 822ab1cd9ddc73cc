"""RoBERTa: BERT's layers, positions counted after the padding index, one token type."""

from sherl_pipe.families.base import Family


class Roberta(Family):
    model_type = "roberta"
    checkpoint_prefixes = ("", "roberta.")
    position_offset = True

    def layer_class(self):
        from transformers.models.roberta.modeling_roberta import RobertaLayer
        return RobertaLayer

    def pooler_class(self):
        from transformers.models.roberta.modeling_roberta import RobertaPooler
        return RobertaPooler


ADAPTER = Roberta()
