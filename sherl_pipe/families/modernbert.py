"""ModernBERT: pre-LN layers (`layers.i`) with rotary positions and attention that alternates
between global and a local sliding window (`config.layer_types`), and a final norm after the last
layer, which the late route therefore needs (shared module `final_norm`). The rotary tables are
built from the config. Attention runs padded (SDPA or eager): transformers' unpadded path is
flash-attention only, and the padded one is the reference the tests check on CPU. No pooler: the
task head pools as `config.classifier_pooling` says (cls or mean)."""

from torch import nn

from sherl_pipe.families.base import Family, Shared


class ModernBert(Family):
    model_type = "modernbert"
    checkpoint_prefixes = ("", "model.")
    embedding_paths = ("embeddings",)
    layers_path = "layers"
    pooler_path = None
    shared = (Shared("final_norm", "final_norm."),)
    post_ln = False
    lora_targets = ("Wqkv", "Wo", "Wi")

    def layer_class(self):
        from transformers.models.modernbert.modeling_modernbert import ModernBertEncoderLayer
        return ModernBertEncoderLayer

    def build_shared(self, config, name):
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def helpers(self, config):
        from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding
        return {"rotary": ModernBertRotaryEmbedding(config=config)}

    def default_pooling(self, config):
        return getattr(config, "classifier_pooling", "cls")

    def uses_token_types(self, config):
        return False

    def layer_norm_eps(self, config):
        return float(config.norm_eps)

    def embed(self, model, input_ids, mask, token_type_ids=None):
        return model.embeddings(input_ids=input_ids)

    def prepare(self, config, modules, hidden, mask):
        import torch
        from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

        kw = {"config": config, "inputs_embeds": hidden, "attention_mask": mask}
        masks = {"full_attention": create_bidirectional_mask(**kw),
                 "sliding_attention": create_bidirectional_sliding_window_mask(**kw)}
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {t: modules["rotary"](hidden, positions, t) for t in set(config.layer_types)}
        return masks, rotary

    def run_layer(self, layer, hidden, context, index, modules):
        masks, rotary = context
        kind = layer.attention_type
        return layer(hidden, attention_mask=masks[kind], position_embeddings=rotary[kind])

    def finish(self, hidden, modules):
        return modules["final_norm"](hidden)


ADAPTER = ModernBert()
