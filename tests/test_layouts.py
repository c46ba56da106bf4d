"""Every family of the layout table on a tiny random config, the override, and the refusals."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from hf_aligned import AlignedConfig, AlignedForSequenceClassification
from hf_aligned.backbones import find_layout
from hf_aligned.layouts import LAYOUTS, table_kind
from tests.testing_utils import DECODER_TYPES, VOCAB_SIZE, reference_layer_logits, tiny_inputs, wrap_plain_model

NUM_LAYERS = 2
HIDDEN = 32
TEXT = {"vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
VISION = {"image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": HIDDEN, "num_hidden_layers": NUM_LAYERS}
VISION_TYPES = ("vit", "deit", "beit", "dinov2")


def tiny_config(model_type):
    """A tiny random config of any family tested here (hidden 32, 2 layers, vocabulary 99, 8x8 grey images)."""
    if model_type == "distilbert":
        return AutoConfig.for_model(
            model_type, vocab_size=VOCAB_SIZE, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=37
        )
    if model_type in ("xlm", "flaubert"):
        return AutoConfig.for_model(
            model_type, vocab_size=VOCAB_SIZE, emb_dim=HIDDEN, n_layers=2, n_heads=4, pad_index=0
        )
    if model_type == "gpt2":
        return AutoConfig.for_model(model_type, vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=2, n_head=4, **TOKENS)
    if model_type in VISION_TYPES:
        return AutoConfig.for_model(model_type, **VISION, num_attention_heads=4, intermediate_size=37)
    if model_type == "modernbert":
        return AutoConfig.for_model(model_type, **TEXT, intermediate_size=37, cls_token_id=1, sep_token_id=2, **TOKENS)
    if model_type == "jamba":  # a hybrid stack: one Mamba block, then one attention block
        return AutoConfig.for_model(
            model_type,
            **TEXT,
            intermediate_size=37,
            num_key_value_heads=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            num_experts=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
            **TOKENS,
        )
    if model_type in DECODER_TYPES:
        return AutoConfig.for_model(
            model_type, **TEXT, intermediate_size=37, num_key_value_heads=2, head_dim=8, **TOKENS
        )
    return AutoConfig.for_model(model_type, **TEXT, intermediate_size=37, **TOKENS)


def family_inputs(model_type, seed=0):
    """Images for vision families; else ragged token ids, left-padded for decoders and right-padded for encoders."""
    if model_type in VISION_TYPES:
        return tiny_inputs("vit", seed=seed)
    return tiny_inputs("llama" if model_type in DECODER_TYPES else "bert", padding_side=padding(model_type), seed=seed)


def padding(model_type):
    return "left" if model_type in DECODER_TYPES else "right"


def wrap(model_type, **aligned_kwargs):
    return wrap_plain_model(tiny_config(model_type), **aligned_kwargs)


@pytest.mark.parametrize("model_type", [*LAYOUTS, "jamba"])
def test_family_matches_hand_computation_from_plain_hidden_states(model_type, tmp_path):
    plain, model = wrap(model_type)
    inputs = family_inputs(model_type)
    with torch.no_grad():
        output = model(**inputs, output_layer_logits=True)
    expected = reference_layer_logits(plain, model, inputs, model_type)
    assert output.layer_logits.shape == (NUM_LAYERS, 3, 3)
    torch.testing.assert_close(output.layer_logits, expected, atol=1e-5, rtol=1e-5)
    assert model.config.pooling == ("last" if model_type in DECODER_TYPES else "cls")

    # Padding invariance: each padded row gives the logits of the same sequence alone.
    if "attention_mask" in inputs:
        for row in range(3):
            keep = inputs["attention_mask"][row].bool()
            with torch.no_grad():
                alone = model(input_ids=inputs["input_ids"][row, keep][None], output_layer_logits=True).layer_logits
            torch.testing.assert_close(output.layer_logits[:, row], alone[:, 0], atol=1e-5, rtol=1e-5)

    # Round trip through the auto class, bit for bit, with the layout recorded in config.json.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(reloaded, AlignedForSequenceClassification)
    assert reloaded.config.layout == model.config.layout
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs, output_layer_logits=True).layer_logits, output.layer_logits)


def test_table_kinds_and_recorded_layouts():
    _, model = wrap("xlm")
    assert model.config.layout == {"blocks": "layer_norm2", "final_norm": None, "pooler": None}
    _, model = wrap("modernbert")
    assert model.config.layout == {"blocks": "layers", "final_norm": "final_norm", "pooler": None}
    assert {table_kind(model_type) for model_type in LAYOUTS} == {"encoder", "vision", "decoder"}


def test_hybrid_stack_of_different_block_classes_is_found_by_the_generic_search():
    _, model = wrap("jamba")
    assert {type(block).__name__ for block in model.blocks} == {"JambaMambaDecoderLayer", "JambaAttentionDecoderLayer"}
    assert model.config.layout == {"blocks": "layers", "final_norm": "final_layernorm", "pooler": None}


def test_several_fitting_lists_are_named_with_the_override():
    # FlauBERT (not in the table) keeps attention, feed-forward and norms as parallel lists of the right length.
    with pytest.raises(
        ValueError,
        match=r"'flaubert' has several lists of 2 blocks.*\['attentions', 'layer_norm1', 'ffns', 'layer_norm2'\].*layout=",
    ):
        wrap("flaubert")


def test_override_picks_the_blocks_and_is_saved_with_the_checkpoint(tmp_path):
    layout = {"blocks": "layer_norm2", "final_norm": None, "pooler": None}
    plain, model = wrap("flaubert", layout=layout)
    inputs = family_inputs("flaubert")
    with torch.no_grad():
        hidden_states = plain(**inputs, output_hidden_states=True).hidden_states
        expected = torch.stack([model.classifier.heads[0].out_proj(hidden[:, 0]) for hidden in hidden_states[1:]])
        output = model(**inputs, output_layer_logits=True)
    torch.testing.assert_close(output.layer_logits, expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layout == layout
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs, output_layer_logits=True).layer_logits, output.layer_logits)


def test_override_without_a_pooler_leaves_it_out():
    _, model = wrap("bert", layout={"blocks": "encoder.layer"})
    assert model.config.use_pooler is False and model.classifier.heads[0].pooler is None
    assert model.backbone.pooler is not None  # not taken out of the base model


@pytest.mark.parametrize(
    ("layout", "error", "message"),
    [
        (["encoder.layer"], TypeError, r"`layout` must be a dict"),
        ({"blocks": "encoder.layer", "head": "x"}, ValueError, r"`layout` has unknown keys \['head'\]"),
        ({"final_norm": None}, ValueError, r"`layout\['blocks'\]` must be a dotted module path"),
        (
            {"blocks": "encoder.layer", "pooler": 3},
            ValueError,
            r"`layout\['pooler'\]` must be a dotted module path or None",
        ),
    ],
)
def test_malformed_override_is_rejected_by_the_config(layout, error, message):
    with pytest.raises(error, match=message):
        AlignedConfig(base_config=tiny_config("bert"), layout=layout)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"blocks": "encoder.layers"}, r"`layout` names blocks 'encoder.layers', but this 'bert' model has no such"),
        ({"blocks": "encoder"}, r"that is not an `nn.ModuleList` of 2 modules"),
        ({"blocks": "encoder.layer", "final_norm": "norm"}, r"names final_norm 'norm', but this 'bert' model has no"),
    ],
)
def test_override_that_does_not_fit_the_model_is_rejected(layout, message):
    with pytest.raises(ValueError, match=message):
        wrap("bert", layout=layout)


def test_override_with_blocks_of_another_width_is_rejected():
    config = tiny_config("bert")
    base = AutoModel.from_config(config)
    # The feed-forward inner layers: a list of 2 modules that output `intermediate_size` (37) features.
    base.inner = torch.nn.ModuleList([block.intermediate for block in base.encoder.layer])
    aligned_config = AlignedConfig(base_config=config, num_labels=2, layout={"blocks": "inner"})
    with pytest.raises(ValueError, match=r"names blocks 'inner', but .* do not all output the hidden size 32"):
        AlignedForSequenceClassification(aligned_config, base_model=base)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            AutoConfig.for_model("bart", vocab_size=99, d_model=16, encoder_layers=2, decoder_layers=2),
            r"Model type 'bart' is an encoder-decoder model: its decoder reads the encoder's output",
        ),
        (
            AutoConfig.for_model("t5", vocab_size=99, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8),
            r"Model type 't5' is an encoder-decoder model",
        ),
        (
            AutoConfig.for_model(
                "clip",
                text_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2},
                vision_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 8},
            ),
            r"Model type 'clip' is a dual encoder: a text tower and an image tower",
        ),
        (
            AutoConfig.for_model(
                "siglip",
                text_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2},
                vision_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 8},
            ),
            r"Model type 'siglip' is a dual encoder",
        ),
        (
            AutoConfig.for_model("convnext", num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
            r"Model type 'convnext' is a hierarchical vision model: its stages change width",
        ),
    ],
    ids=["bart", "t5", "clip", "siglip", "convnext"],
)
def test_unwrappable_families_are_refused_with_their_own_reason(config, message):
    with pytest.raises(ValueError, match=message):
        AlignedForSequenceClassification(AlignedConfig(base_config=config, num_labels=2))
    # An override does not make them wrappable: the reason is the architecture, not where the blocks are.
    with pytest.raises(ValueError, match=message):
        find_layout(AutoModel.from_config(config), override={"blocks": "encoder.layers"})
