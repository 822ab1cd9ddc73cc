"""DistilBERT: `transformer.layer` blocks with their own linear names, no token types, no pooler
(its task head reads the first token)."""

from sherl_pipe.families.base import Family


class DistilBert(Family):
    model_type = "distilbert"
    checkpoint_prefixes = ("", "distilbert.")
    layers_path = "transformer.layer"
    pooler_path = None
    lora_targets = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")
    layer_takes_index = False

    def layer_class(self):
        from transformers.models.distilbert.modeling_distilbert import TransformerBlock
        return TransformerBlock

    def uses_token_types(self, config):
        return False

    def embed(self, model, input_ids, mask, token_type_ids=None):
        return model.embeddings(input_ids)


ADAPTER = DistilBert()
