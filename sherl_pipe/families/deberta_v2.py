"""DeBERTa-v2 and -v3: post-LN layers with disentangled attention. Every layer reads the relative
position embeddings (normalised by the encoder's LayerNorm) and the relative positions, which the
encoder computes once per batch; the first layer's output also passes the encoder's convolution
when the config has one. The late route needs these: the shared module `encoder` (the encoder
without its layers). Padded positions are zeroed in the embeddings, as the model does. Eager
attention only (transformers has no SDPA path for DeBERTa)."""

from sherl_pipe.families.base import Family, Shared, without_layers


class DebertaV2(Family):
    model_type = "deberta-v2"
    checkpoint_prefixes = ("", "deberta.")
    pooler_path = None  # the ContextPooler belongs to the task model, not the backbone
    shared = (Shared("encoder", "encoder.", exclude=("layer.",)),)
    attention = ("eager",)
    lora_targets = ("query_proj", "key_proj", "value_proj", "pos_query_proj", "pos_key_proj", "dense")
    layer_takes_index = False

    def layer_class(self):
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Layer
        return DebertaV2Layer

    def build_shared(self, config, name):
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder

        return DebertaV2Encoder(without_layers(config))

    def uses_token_types(self, config):
        return (getattr(config, "type_vocab_size", 0) or 0) > 0

    def embed(self, model, input_ids, mask, token_type_ids=None):
        types = token_type_ids if self.uses_token_types(model.config) else None
        return model.embeddings(input_ids=input_ids, token_type_ids=types, mask=mask)

    def prepare(self, config, modules, hidden, mask):
        encoder = modules["encoder"]
        return encoder.get_attention_mask(mask), encoder.get_rel_pos(hidden), encoder.get_rel_embedding(), mask

    def run_layer(self, layer, hidden, context, index, modules):
        attention_mask, relative_pos, rel_embeddings, mask = context
        out = layer(hidden, attention_mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
        conv = modules["encoder"].conv
        if index == 0 and conv is not None:
            out = conv(hidden, out, mask)
        return out


ADAPTER = DebertaV2()
