"""Sharded models: accelerate's default FSDP2 wrap finds each aligned model's blocks by itself, and an aligned model
can be built over parameters that DeepSpeed ZeRO-3 has partitioned (empty, with their shape in `ds_shape`)."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from transformers import BertModel

from hf_aligned import AlignedForCausalLM
from hf_aligned.backbones import find_layout

from .testing_utils import HIDDEN_SIZE, tiny_base_config, tiny_model


def wrapped_modules(model) -> list[str]:
    """The modules accelerate's default `TRANSFORMER_BASED_WRAP` (no class names given) shards one by one."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [name for name, module in model.named_modules() if policy(module)]


def block_names(model, blocks) -> list[str]:
    ids = {id(block) for block in blocks}
    return [name for name, module in model.named_modules() if id(module) in ids]


@pytest.mark.parametrize("family", ["bert", "distilbert", "vit", "llama", "gpt2"])
def test_the_default_transformer_wrap_shards_exactly_the_blocks_of_a_classifier(family):
    # Only the blocks: accelerate shards the input embedding on its own as well, so a wrapped embeddings module (BERT
    # and ViT list theirs) made FSDP2 shard the word embedding twice (TypeError); DistilBERT's blocks were not listed.
    model = tiny_model(family)
    blocks = block_names(model, model.blocks)
    assert len(blocks) == model.num_layers
    assert wrapped_modules(model) == blocks


def test_the_blocks_are_wrapped_also_when_the_backbone_names_no_class(monkeypatch):
    monkeypatch.setattr(BertModel, "_no_split_modules", None)
    model = tiny_model("bert")
    assert wrapped_modules(model) == block_names(model, model.blocks)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_default_transformer_wrap_shards_every_block_of_a_causal_lm(family):
    model = AlignedForCausalLM.from_config(tiny_base_config(family))
    assert wrapped_modules(model) == block_names(model, model.aligned_blocks)


def test_the_layout_of_a_backbone_whose_parameters_zero3_partitioned_is_found():
    # Under ZeRO-3, transformers builds a model from a config inside DeepSpeed's `zero.Init`: every parameter is
    # empty outside its module's forward and keeps its shape in `ds_shape`; the layout check reads that shape (it
    # refused the model as "blocks do not all output the hidden size" before).
    model = AlignedForCausalLM.from_config(tiny_base_config("llama"))
    expected = find_layout(model.model)
    for parameter in model.parameters():
        parameter.ds_shape = parameter.shape
        parameter.data = torch.empty(0)
    assert find_layout(model.model) == expected
    assert model.model.norm.weight.ds_shape == (HIDDEN_SIZE,)
