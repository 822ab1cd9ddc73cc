"""XLM-RoBERTa: RoBERTa's architecture with a multilingual vocabulary (task heads keep `roberta.`)."""

from sherl_pipe.families.roberta import Roberta


class XlmRoberta(Roberta):
    model_type = "xlm-roberta"
    checkpoint_prefixes = ("", "roberta.", "xlm_roberta.")

    def layer_class(self):
        from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer
        return XLMRobertaLayer

    def pooler_class(self):
        from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaPooler
        return XLMRobertaPooler


ADAPTER = XlmRoberta()
