"""AlignedForSequenceClassification on tiny random configs of every supported family."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AlbertConfig,
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    DeiTConfig,
    ElectraConfig,
    Qwen2Config,
    SwinConfig,
)

from hf_aligned import AlignedConfig, AlignedForSequenceClassification
from tests.testing_utils import (
    DECODER_FAMILIES,
    FAMILIES,
    FINAL_NORM,
    LAST_HIDDEN_STATE_IS_NORMED,
    NUM_LAYERS,
    TEXT_FAMILIES,
    reference_layer_logits,
    tiny_base_config,
    tiny_inputs,
    tiny_model,
    wrap_plain_model,
)


def padding_for(family):
    return "left" if family in DECODER_FAMILIES else "right"


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_logits_match_manual_computation_from_hidden_states(family):
    plain, model = wrap_plain_model(tiny_base_config(family))
    inputs = tiny_inputs(family, padding_side=padding_for(family))
    with torch.no_grad():
        output = model(**inputs, output_layer_logits=True)
    expected = reference_layer_logits(plain, model, inputs, family)
    assert output.layer_logits.shape == (NUM_LAYERS, 3, 3)
    torch.testing.assert_close(output.layer_logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.logits, expected[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "base_config"),
    [
        (
            "qwen2",
            Qwen2Config(
                vocab_size=99,
                hidden_size=32,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=37,
                pad_token_id=0,
            ),
        ),
        (
            "electra",
            ElectraConfig(
                vocab_size=99,
                embedding_size=16,
                hidden_size=32,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4,
                intermediate_size=37,
            ),
        ),
        (
            "deit",
            DeiTConfig(
                image_size=8,
                patch_size=4,
                num_channels=1,
                hidden_size=32,
                num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4,
                intermediate_size=37,
            ),
        ),
    ],
)
def test_families_beyond_the_six_work_without_special_cases(family, base_config):
    plain, model = wrap_plain_model(base_config)
    kind = "vit" if family == "deit" else ("llama" if family == "qwen2" else "bert")
    inputs = tiny_inputs(kind, padding_side=padding_for(kind))
    with torch.no_grad():
        output = model(**inputs, output_layer_logits=True)
    torch.testing.assert_close(
        output.layer_logits, reference_layer_logits(plain, model, inputs, family), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_decoder_pools_last_real_token_with_either_padding(family, padding_side):
    model = tiny_model(family)
    inputs = tiny_inputs(family, batch_size=4, padding_side=padding_side, seed=3)
    with torch.no_grad():
        batched = model(**inputs, output_layer_logits=True).layer_logits
        for row in range(4):
            keep = inputs["attention_mask"][row].bool()
            alone = model(input_ids=inputs["input_ids"][row, keep][None], output_layer_logits=True).layer_logits[:, 0]
            torch.testing.assert_close(batched[:, row], alone, atol=1e-5, rtol=1e-5)


def test_decoder_without_attention_mask_pools_last_non_pad_token():
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", padding_side="right", seed=1)
    with torch.no_grad():
        with_mask = model(**inputs, output_layer_logits=True).layer_logits
        from_pad_ids = model(input_ids=inputs["input_ids"], output_layer_logits=True).layer_logits
    # Right padding never changes earlier positions under causal attention, so only the pooled index matters.
    torch.testing.assert_close(with_mask, from_pad_ids, atol=1e-5, rtol=1e-5)


def test_mean_pooling_ignores_padding():
    model = tiny_model("bert", pooling="mean")
    inputs = tiny_inputs("bert", seed=2)
    with torch.no_grad():
        batched = model(**inputs, output_layer_logits=True).layer_logits
        for row in range(3):
            keep = inputs["attention_mask"][row].bool()
            alone = model(input_ids=inputs["input_ids"][row, keep][None], output_layer_logits=True).layer_logits[:, 0]
            torch.testing.assert_close(batched[:, row], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("layer_weights", "expected"),
    [
        ("linear", [2 * layer / (NUM_LAYERS * (NUM_LAYERS + 1)) for layer in range(1, NUM_LAYERS + 1)]),
        ("uniform", [1 / NUM_LAYERS] * NUM_LAYERS),
        ("last", [0.0, 0.0, 0.0, 1.0]),
        ([1.0, 0.0, 3.0, 0.0], [0.25, 0.0, 0.75, 0.0]),
    ],
)
def test_aligned_loss_is_weighted_sum_of_per_layer_cross_entropy(layer_weights, expected):
    model = tiny_model("bert", layer_weights=layer_weights)
    inputs = tiny_inputs("bert")
    labels = torch.tensor([0, 2, 1])
    output = model(**inputs, labels=labels, output_layer_logits=True)
    per_layer = torch.stack([F.cross_entropy(logits, labels) for logits in output.layer_logits])
    torch.testing.assert_close(output.layer_losses, per_layer)
    torch.testing.assert_close(output.loss, (torch.tensor(expected) * per_layer).sum())


def test_aligned_layers_restrict_the_loss_to_a_subset():
    model = tiny_model("bert", layer_weights="linear", aligned_layers=[2, 4])
    assert model.config.resolved_layer_weights == pytest.approx([0.0, 2 / 6, 0.0, 4 / 6])


def test_ignored_labels_do_not_count():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    output = model(**inputs, labels=torch.tensor([0, -100, 1]), output_layer_logits=True)
    keep = torch.tensor([0, 2])
    expected = torch.stack([F.cross_entropy(logits[keep], torch.tensor([0, 1])) for logits in output.layer_logits])
    torch.testing.assert_close(output.layer_losses, expected)


def test_regression_uses_mean_squared_error_per_layer():
    model = tiny_model("bert", num_labels=1)
    labels = torch.tensor([0.5, -1.0, 2.0])
    output = model(**tiny_inputs("bert"), labels=labels, output_layer_logits=True)
    expected = torch.stack([F.mse_loss(logits.squeeze(-1), labels) for logits in output.layer_logits])
    torch.testing.assert_close(output.layer_losses, expected)
    assert model.config.problem_type == "regression"


def test_multi_label_uses_binary_cross_entropy_per_layer():
    model = tiny_model("bert", problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    output = model(**tiny_inputs("bert"), labels=labels, output_layer_logits=True)
    expected = torch.stack([F.binary_cross_entropy_with_logits(logits, labels) for logits in output.layer_logits])
    torch.testing.assert_close(output.layer_losses, expected)


def test_out_of_range_labels_are_named():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"class indices \[3, 7\] outside \[0, 3\)"):
        model(**tiny_inputs("bert"), labels=torch.tensor([3, 1, 7]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_weights": [1.0, 2.0]}, r"`layer_weights` has 2 entries but the model has 4 layers"),
        ({"layer_weights": [1.0, -1.0, 0.0, 1.0]}, r"`layer_weights` must be finite and non-negative"),
        ({"layer_weights": [0.0, 0.0, 0.0, 0.0]}, r"`layer_weights` are zero on every aligned layer"),
        (
            {"layer_weights": [1.0, 0.0, 0.0, 0.0], "aligned_layers": [3, 4]},
            r"zero on every aligned layer \(\[3, 4\]\)",
        ),
        ({"layer_weights": "quadratic"}, r"`layer_weights='quadratic'` is not a known scheme"),
        ({"aligned_layers": [0, 2]}, r"`aligned_layers` holds 0"),
        ({"pooling": "max"}, r"`pooling='max'` is not supported"),
        ({"classifier_sharing": "some"}, r"`classifier_sharing='some'` is not supported"),
    ],
)
def test_invalid_settings_are_rejected_with_the_argument_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignedConfig(base_config=tiny_base_config("bert"), **kwargs)


def test_hierarchical_backbone_is_rejected_with_its_model_type():
    swin = SwinConfig(image_size=16, patch_size=2, num_channels=1, embed_dim=8, depths=[1, 1], num_heads=[1, 2])
    with pytest.raises(ValueError, match=r"Model type 'swin' is a hierarchical vision model: its stages change width"):
        AlignedForSequenceClassification(AlignedConfig(base_config=swin, num_labels=2))


def test_backbone_without_a_block_list_is_rejected_with_its_model_type():
    albert = AlbertConfig(
        vocab_size=99,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
    )
    with pytest.raises(ValueError, match=r"Model type 'albert' has no list of 4 transformer blocks"):
        AlignedForSequenceClassification(AlignedConfig(base_config=albert, num_labels=2))


def test_use_pooler_without_pooler_is_rejected():
    with pytest.raises(ValueError, match=r"`use_pooler=True` but model type 'gpt2' has no pooler"):
        tiny_model("gpt2", use_pooler=True, pooling="cls")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_give_bit_identical_logits(family, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(family, padding_side=padding_for(family))
    model.save_pretrained(tmp_path)
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(
            model(**inputs, output_layer_logits=True).layer_logits,
            reloaded(**inputs, output_layer_logits=True).layer_logits,
        )


def test_auto_classes_load_aligned_checkpoints_without_remote_code(tmp_path):
    model = tiny_model("llama", layer_weights="uniform")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, AlignedConfig)
    assert config.base_config.model_type == "llama"
    assert config.layer_weights == "uniform"
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(reloaded, AlignedForSequenceClassification)
    inputs = tiny_inputs("llama", padding_side="left")
    with torch.no_grad():
        assert torch.equal(
            model(**inputs, output_layer_logits=True).layer_logits,
            reloaded(**inputs, output_layer_logits=True).layer_logits,
        )


def test_per_layer_heads_baseline_round_trips(tmp_path):
    model = tiny_model("bert", classifier_sharing="per_layer")
    assert len(model.classifier.heads) == NUM_LAYERS
    inputs = tiny_inputs("bert")
    model.save_pretrained(tmp_path)
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        output = model(**inputs, output_layer_logits=True)
        assert torch.equal(output.layer_logits, reloaded(**inputs, output_layer_logits=True).layer_logits)
    # Each layer is classified by its own head: layer l's logits come from head l.
    hidden = model.backbone(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad():
        second = model.classifier.heads[1].out_proj(model.classifier.heads[1].pooler(hidden[2]))
    torch.testing.assert_close(output.layer_logits[1], second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "vit", "gpt2"])
def test_from_pretrained_on_a_base_checkpoint_keeps_every_pretrained_weight(family, tmp_path):
    torch.manual_seed(1)
    base = AutoModel.from_config(tiny_base_config(family))
    base.save_pretrained(tmp_path)
    expected = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = AlignedForSequenceClassification.from_pretrained(tmp_path, num_labels=5, layer_weights="uniform")
    assert model.config.num_labels == 5 and model.config.layer_weights == "uniform"
    loaded = {f"backbone.{name}": tensor for name, tensor in model.state_dict().items()}
    moved = {}
    if family in FINAL_NORM:
        moved.update({f"{FINAL_NORM[family]}.{p}": f"classifier.heads.0.norm.{p}" for p in ("weight", "bias")})
    if model.config.use_pooler:
        moved.update({f"pooler.dense.{p}": f"classifier.heads.0.pooler.dense.{p}" for p in ("weight", "bias")})
    state = model.state_dict()
    for name, tensor in expected.items():
        actual = state[moved[name]] if name in moved else loaded[f"backbone.backbone.{name}"]
        assert torch.equal(actual, tensor), name
    # Only the new classification layer is initialized (normal(0, initializer_range), zero bias).
    out_proj = model.classifier.heads[0].out_proj
    assert torch.equal(out_proj.bias, torch.zeros(5))
    assert 0.005 < out_proj.weight.std().item() < 0.05


def test_base_checkpoint_without_trained_pooler_does_not_use_one(tmp_path):
    torch.manual_seed(1)
    AutoModel.from_config(tiny_base_config("bert"), add_pooling_layer=False).save_pretrained(tmp_path)
    model = AlignedForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert model.config.use_pooler is False
    assert model.classifier.heads[0].pooler is None


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs, labels = tiny_inputs("llama", padding_side="left"), torch.tensor([0, 1, 2])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama").train()
        model.config.base_config.attention_dropout = 0.0
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:  # transformers < 5.23 names it gradient checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs, labels=labels).loss.backward()
        grads.append([parameter.grad.clone() for parameter in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_pooled_layer_states_match_hidden_states(family):
    plain, model = wrap_plain_model(tiny_base_config(family), pooling="mean")
    inputs = tiny_inputs(family, padding_side=padding_for(family))
    states = model.pooled_layer_states(**inputs)
    if family in DECODER_FAMILIES:
        inputs = {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        hidden_states = plain(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"].float()[..., None]
    last = NUM_LAYERS if family not in LAST_HIDDEN_STATE_IS_NORMED else NUM_LAYERS - 1  # GPT-2/Llama: last is normed
    for layer in range(last + 1):
        expected = (hidden_states[layer] * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(states[layer], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_wrapping_keeps_the_base_models_attention_implementation(implementation):
    base = AutoModel.from_config(tiny_base_config("bert"), attn_implementation=implementation)
    model = AlignedForSequenceClassification(AlignedConfig(base_config=base.config, num_labels=2), base_model=base)
    assert model.backbone.config._attn_implementation == implementation
    assert model.config.base_config is model.backbone.config


def test_base_checkpoint_loaded_in_half_precision_gets_a_matching_classifier(tmp_path):
    AutoModel.from_config(tiny_base_config("llama")).save_pretrained(tmp_path)
    model = AlignedForSequenceClassification.from_pretrained(tmp_path, num_labels=2, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    inputs = tiny_inputs("llama", padding_side="left")
    with torch.no_grad():
        assert model(**inputs, output_layer_logits=True).layer_logits.dtype == torch.bfloat16
