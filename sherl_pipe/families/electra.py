"""ELECTRA (the discriminator): BERT's layers, no pooler (its task head reads the first token), and
embeddings narrower than the layers projected up by `embeddings_project` when the config says so."""

from sherl_pipe.families.base import Family


class Electra(Family):
    model_type = "electra"
    checkpoint_prefixes = ("", "electra.")
    embedding_paths = ("embeddings", "embeddings_project")
    pooler_path = None

    def layer_class(self):
        from transformers.models.electra.modeling_electra import ElectraLayer
        return ElectraLayer

    def embed(self, model, input_ids, mask, token_type_ids=None):
        hidden = super().embed(model, input_ids, mask, token_type_ids)
        project = getattr(model, "embeddings_project", None)
        return project(hidden) if project is not None else hidden


ADAPTER = Electra()
