"""MPNet: BERT-like post-LN layers whose attention adds a relative position bias. The encoder
computes that bias once per batch from its own `relative_attention_bias` table and passes it to
every layer, so the late route needs the table: the shared module `encoder` (the encoder without
its layers). transformers has only eager attention for MPNet."""

from sherl_pipe.families.base import Family, Shared, without_layers


class MPNet(Family):
    model_type = "mpnet"
    checkpoint_prefixes = ("", "mpnet.")
    shared = (Shared("encoder", "encoder.", exclude=("layer.",)),)
    attention = ("eager",)
    lora_targets = ("q", "k", "v", "o", "dense")
    layer_takes_index = False
    position_offset = True

    def layer_class(self):
        from transformers.models.mpnet.modeling_mpnet import MPNetLayer
        return MPNetLayer

    def pooler_class(self):
        from transformers.models.mpnet.modeling_mpnet import MPNetPooler
        return MPNetPooler

    def build_shared(self, config, name):
        from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

        return MPNetEncoder(without_layers(config))

    def uses_token_types(self, config):
        return False

    def embed(self, model, input_ids, mask, token_type_ids=None):
        return model.embeddings(input_ids=input_ids)

    def prepare(self, config, modules, hidden, mask):
        return super().prepare(config, modules, hidden, mask), modules["encoder"].compute_position_bias(hidden)

    def run_layer(self, layer, hidden, context, index, modules):
        mask, bias = context
        return layer(hidden, mask, position_bias=bias)[0]


ADAPTER = MPNet()
