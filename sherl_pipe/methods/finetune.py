"""Fine-tuning the whole backbone, live from the cache's input_ids: every weight (full-finetune,
the accuracy reference) or LoRA adapters on every layer (lora-finetune, peft), with the same
pooling and head as the cached methods. Neither reads a tier: they run the backbone themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel

from sherl_pipe.dropout import use_fast_dropout
from sherl_pipe.families import family_of
from sherl_pipe.fields import at_least
from sherl_pipe.methods.base import Method, Options, lora_parameters
from sherl_pipe.methods.spec import ModelSpec
from sherl_pipe.model import Head, pool

FULL_FT_LR = 3e-5  # the pretrained weights' rate (train.lr_late = 0)


class FullFinetune(Method):
    name = "full-finetune"
    sources = ("live",)
    whole_backbone = True
    trains = "every backbone weight + head"
    source_text = "the accuracy reference"

    def spec_options(self, options: Options, manifest: dict) -> Options:
        return options  # it reads no tier: any cache serves it

    def reads(self, spec) -> list[int]:
        return []

    def asks(self, options, num_layers: int) -> str:
        return f"train.method = {self.name!r} (no tier: it runs the backbone)"

    def loads(self, spec, family) -> list[str]:
        return []  # the whole backbone (whole_backbone)

    def lr_pretrained(self, spec, cfg) -> float:
        return FULL_FT_LR

    def empty_modules(self, spec, config) -> dict[str, nn.Module]:
        return {"backbone": AutoModel.from_config(config, dtype=torch.float32)}

    def build(self, spec, config, modules: dict[str, nn.Module]) -> nn.Module:
        return FinetuneModel(spec, modules["backbone"])


@dataclass(frozen=True)
class LoraOptions(Options):
    """lora-finetune's settings: [train] keys, or a [train.lora-finetune] table."""

    lora_rank: int = at_least(8, 1)
    lora_alpha: float = at_least(16.0, 0.0)


class LoraFinetune(FullFinetune):
    name = "lora-finetune"
    Options = LoraOptions
    lr = 5e-4
    trains = "LoRA adapters (lora_rank, lora_alpha) on every layer's attention and dense weights + head"
    source_text = "Hu et al., ICLR 2022, with peft"

    def lr_pretrained(self, spec, cfg) -> float:
        return 0.0

    def build(self, spec, config, modules: dict[str, nn.Module]) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model  # peft is heavy: imported when a model is built

        family = family_of(config.model_type)
        backbone = modules["backbone"]
        backbone.requires_grad_(False)
        cfg = LoraConfig(r=spec.options.lora_rank, lora_alpha=spec.options.lora_alpha, lora_dropout=0.0,
                         target_modules=list(family.lora_targets))
        for i, layer in enumerate(family.layers(backbone)):  # the layers only: not the pooler's dense
            family.layers(backbone)[i] = inject_adapter_in_model(cfg, layer)
        adapters = lora_parameters(backbone)
        for p in backbone.parameters():
            p.requires_grad_(id(p) in adapters)
        return FinetuneModel(spec, backbone)


class FinetuneModel(nn.Module):
    """The whole backbone, with the same pooling and head as the cached methods."""

    def __init__(self, spec: ModelSpec, backbone_model: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone_model
        self.config = backbone_model.config
        self.family = family_of(backbone_model.config.model_type)
        self.head = Head(backbone_model.config.hidden_size, spec.num_outputs, spec.dropout, spec.target_scale,
                         spec.head_norm)
        use_fast_dropout(self)  # the same dropout as SHERL's, so the speed comparison stays fair

    def forward(self, input_ids, mask, token_type_ids=None) -> torch.Tensor:
        out = self.backbone(**self.family.forward_kwargs(self.backbone, input_ids, mask, token_type_ids))
        return self.head(pool(out.last_hidden_state, mask, self.spec.pooling, self.family.pooler(self.backbone)))

    def forward_batch(self, batch) -> torch.Tensor:
        return self(batch.input_ids, batch.mask, batch.token_type_ids)

    def new_modules(self) -> list[nn.Module]:
        return [self.head]
