"""The projection head (`AlignedConfig(projection_head=...)`) and the two representation stages of
`pooled_layer_states` (`"pre"`: before the classifier, `"post"`: what the classification layer reads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertTokenizerFast

from hf_aligned import (
    AlignedConfig,
    AlignedForSequenceClassification,
    AlignedTrainer,
    AlignedTrainingArguments,
    RepresentationDynamicsCallback,
    cosine_similarity_matrix,
    layer_representations,
)
from hf_aligned.cli import main

from .test_cli import WORDS, numpy_cos_matrix, write_texts
from .testing_utils import NUM_LAYERS, tiny_base_config, tiny_inputs

HEAD = {"hidden_size": 16, "num_layers": 2, "activation": "gelu"}


def head_model(
    pooling: str = "mean", seed: int = 0, **kwargs
) -> tuple[torch.nn.Module, AlignedForSequenceClassification]:
    """A plain tiny BERT and an aligned model wrapping an exact copy of it with a projection head, both in eval mode,
    with every dropout off."""
    base = tiny_base_config("bert")
    base.hidden_dropout_prob = base.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    plain = AutoModel.from_config(base).eval()
    kwargs.setdefault("projection_head", HEAD)
    config = AlignedConfig(base_config=base, num_labels=3, pooling=pooling, classifier_dropout=0.0, **kwargs)
    model = AlignedForSequenceClassification(config)
    model.backbone.load_state_dict(plain.state_dict(), strict=False)
    if model.config.use_pooler:
        for head in model.classifier.heads:
            head.pooler.load_state_dict(plain.pooler.state_dict())
    return plain, model.eval()


def hand_pooled(plain, inputs, pooling: str) -> list[torch.Tensor]:
    """Every layer's pooled vector (embedding output first), from the plain model's `output_hidden_states`."""
    with torch.no_grad():
        hidden_states = plain(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"].float()
    if pooling == "mean":
        return [(hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for hidden in hidden_states]
    return [hidden[:, 0] for hidden in hidden_states]


def hand_mlp(head: torch.nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """The projection head written out: GELU(W x + b), twice, with the head's own weights."""
    for linear in (head.projection[0], head.projection[2]):
        vectors = F.gelu(vectors @ linear.weight.T + linear.bias)
    return vectors


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def test_config_fills_in_defaults_and_round_trips(tmp_path):
    base = tiny_base_config("bert")
    assert AlignedConfig(base_config=base).projection_head is None
    defaults = AlignedConfig(base_config=base, projection_head={})
    assert defaults.projection_head == {"hidden_size": 32, "num_layers": 1, "activation": "relu"}
    config = AlignedConfig(base_config=base, projection_head={"num_layers": 3, "activation": "tanh"})
    config.save_pretrained(tmp_path)
    reloaded = AlignedConfig.from_pretrained(tmp_path)
    assert reloaded.projection_head == {"hidden_size": 32, "num_layers": 3, "activation": "tanh"}
    assert json.loads((tmp_path / "config.json").read_text())["projection_head"] == reloaded.projection_head


def test_model_round_trips_bit_for_bit(tmp_path):
    _, model = head_model()
    inputs = tiny_inputs("bert", batch_size=4)
    model.save_pretrained(tmp_path)
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.projection_head == HEAD
    assert {name for name in reloaded.state_dict() if ".projection." in name} == {
        "classifier.heads.0.projection.0.weight",
        "classifier.heads.0.projection.0.bias",
        "classifier.heads.0.projection.2.weight",
        "classifier.heads.0.projection.2.bias",
    }
    with torch.no_grad():
        expected = model(**inputs, output_layer_logits=True).layer_logits
        assert torch.equal(reloaded(**inputs, output_layer_logits=True).layer_logits, expected)
        assert torch.equal(
            reloaded.pooled_layer_states(**inputs, stage="post"), model.pooled_layer_states(**inputs, stage="post")
        )


@pytest.mark.parametrize(
    ("projection_head", "error", "message"),
    [
        ("yes", TypeError, "`projection_head` must be None or a dict"),
        ({"depth": 2}, ValueError, r"unknown keys \['depth'\]"),
        ({"num_layers": 0}, ValueError, r"`projection_head\['num_layers'\]` must be a positive integer, got 0"),
        ({"hidden_size": 8.5}, ValueError, r"`projection_head\['hidden_size'\]` must be a positive integer"),
        ({"num_layers": True}, ValueError, r"`projection_head\['num_layers'\]` must be a positive integer"),
        ({"activation": "sparkle"}, ValueError, "='sparkle'` is not a known activation; use one of"),
    ],
)
def test_bad_projection_heads_are_errors(projection_head, error, message):
    with pytest.raises(error, match=message):
        AlignedConfig(base_config=tiny_base_config("bert"), projection_head=projection_head)


def test_from_pretrained_on_a_base_checkpoint_takes_the_option(tmp_path):
    plain = AutoModel.from_config(tiny_base_config("bert"))
    plain.save_pretrained(tmp_path)
    model = AlignedForSequenceClassification.from_pretrained(
        tmp_path, num_labels=2, projection_head={"hidden_size": 8}
    )
    head = model.classifier.heads[0]
    assert [type(layer).__name__ for layer in head.projection] == ["Linear", "ReLU"]
    assert (head.projection[0].in_features, head.projection[0].out_features, head.out_proj.in_features) == (32, 8, 8)
    assert model.has_new_classifier


# ---------------------------------------------------------------------------------------------------------------
# The head inside the classifier
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_shared_head_is_applied_after_every_layer(pooling):
    plain, model = head_model(pooling)
    assert model.config.use_pooler == (pooling == "cls")
    inputs = tiny_inputs("bert", batch_size=5)
    head = model.classifier.heads[0]
    pooled = hand_pooled(plain, inputs, pooling)
    expected = []
    for vectors in pooled[1:]:
        if pooling == "cls":
            vectors = plain.pooler.activation(plain.pooler.dense(vectors))
        expected.append(hand_mlp(head, vectors) @ head.out_proj.weight.T + head.out_proj.bias)
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
        torch.testing.assert_close(layer_logits, torch.stack(expected), rtol=1e-5, atol=1e-6)
        # Early exit serves with the same classifier: the last layer's scores are the full forward's.
        torch.testing.assert_close(model.early_exit_predict(**inputs).logits, layer_logits[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_stages_equal_hand_computations(pooling):
    plain, model = head_model(pooling)
    inputs = tiny_inputs("bert", batch_size=5)
    pooled = hand_pooled(plain, inputs, pooling)
    head = model.classifier.heads[0]
    with torch.no_grad():
        pre = model.pooled_layer_states(**inputs)
        torch.testing.assert_close(model.pooled_layer_states(**inputs, stage="pre"), pre, rtol=0, atol=0)
        post = model.pooled_layer_states(**inputs, stage="post")
        torch.testing.assert_close(pre, torch.stack(pooled), rtol=1e-5, atol=1e-6)
        if pooling == "cls":
            pooled = [plain.pooler.activation(plain.pooler.dense(vectors)) for vectors in pooled]
        torch.testing.assert_close(post, torch.stack([hand_mlp(head, v) for v in pooled]), rtol=1e-5, atol=1e-6)
    assert post.shape == (NUM_LAYERS + 1, 5, HEAD["hidden_size"])
    # The classification layer reads the post-stage vectors.
    logits = model(**inputs, output_layer_logits=True).layer_logits
    torch.testing.assert_close(head.out_proj(post[1:]), logits, rtol=1e-5, atol=1e-6)


def test_without_a_head_post_is_what_the_classification_layer_reads():
    plain, model = head_model("cls", projection_head=None)
    inputs = tiny_inputs("bert", batch_size=4)
    with torch.no_grad():
        post = model.pooled_layer_states(**inputs, stage="post")
        expected = [plain.pooler(hidden) for hidden in plain(**inputs, output_hidden_states=True).hidden_states]
        torch.testing.assert_close(post, torch.stack(expected), rtol=1e-5, atol=1e-6)
    _, mean_model = head_model("mean", projection_head=None)
    with torch.no_grad():  # mean pooling, no norm, no pooler: the two stages are the same vectors
        assert torch.equal(
            mean_model.pooled_layer_states(**inputs, stage="post"), mean_model.pooled_layer_states(**inputs)
        )


def test_per_layer_baseline_gets_one_head_per_layer():
    plain, model = head_model("mean", classifier_sharing="per_layer")
    heads = model.classifier.heads
    assert len(heads) == NUM_LAYERS
    assert len({head.projection[0].weight.data_ptr() for head in heads}) == NUM_LAYERS
    for head in heads:  # distinct random initializations
        torch.nn.init.normal_(head.projection[0].weight)
    inputs = tiny_inputs("bert", batch_size=4)
    pooled = hand_pooled(plain, inputs, "mean")
    with torch.no_grad():
        logits = model(**inputs, output_layer_logits=True).layer_logits
        post = model.pooled_layer_states(**inputs, stage="post")
    for layer in range(1, NUM_LAYERS + 1):
        head = heads[layer - 1]
        expected = hand_mlp(head, pooled[layer])
        torch.testing.assert_close(post[layer], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits[layer - 1], head.out_proj(expected), rtol=1e-5, atol=1e-6)
    # The embedding output has no head of its own: it goes through block 1's.
    torch.testing.assert_close(post[0], hand_mlp(heads[0], pooled[0]), rtol=1e-5, atol=1e-6)
    truncated = model.truncate(2)
    assert len(truncated.classifier.heads) == 2


def test_classifier_update_last_keeps_the_head_out_of_the_earlier_layers_losses():
    _, last = head_model("mean", classifier_update="last", layer_weights="uniform")
    _, reference = head_model("mean", classifier_update="all", layer_weights="uniform")
    inputs = tiny_inputs("bert", batch_size=5)
    labels = torch.tensor([0, 2, 1, 1, 2])
    last.train()(**inputs, labels=labels).loss.backward()
    # Reference: only the last layer's weighted loss reaches the classifier.
    output = reference.train()(**inputs, labels=labels)
    (output.layer_losses[-1] / NUM_LAYERS).backward()
    for name, parameter in last.classifier.named_parameters():
        expected = dict(reference.classifier.named_parameters())[name].grad
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-7)
    assert last.classifier.heads[0].projection[0].weight.grad.abs().sum() > 0


def test_the_classifier_learning_rate_applies_to_the_projection_head(tmp_path):
    _, model = head_model("mean")
    args = AlignedTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, learning_rate=1e-3, classifier_lr_ratio=20.0
    )
    optimizer = AlignedTrainer(model, args).create_optimizer()
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    rates = {names[id(parameter)]: group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
    fast = {name for name, rate in rates.items() if rate == pytest.approx(2e-2)}
    assert fast == {name for name in rates if ".projection." in name or ".out_proj." in name}
    assert len(fast) == 6
    assert all(rate == pytest.approx(1e-3) for name, rate in rates.items() if name not in fast)


# ---------------------------------------------------------------------------------------------------------------
# Stages in the analyses
# ---------------------------------------------------------------------------------------------------------------


def test_stage_errors_name_the_fix():
    _, model = head_model("mean")
    inputs = tiny_inputs("bert", batch_size=2)
    with pytest.raises(ValueError, match=r"`stage='middle'` is not supported; use one of \('pre', 'post'\)"):
        model.pooled_layer_states(**inputs, stage="middle")
    with pytest.raises(ValueError, match="`pooling='cls'` cannot be combined with `stage='post'`"):
        model.pooled_layer_states(**inputs, pooling="cls", stage="post")
    with pytest.raises(ValueError, match=r"`stage='after'` is not supported"):
        layer_representations(model, [inputs], stage="after")
    with pytest.raises(ValueError, match=r"`stage='after'` is not supported"):
        RepresentationDynamicsCallback([inputs], stage="after")


def test_layer_representations_and_the_dynamics_callback_read_the_stage(tmp_path):
    _, model = head_model("mean")
    batches = [
        tiny_inputs("bert", batch_size=4, seed=seed) | {"labels": torch.tensor([0, 1, 2, 0])} for seed in (1, 2)
    ]
    post = layer_representations(model, batches, stage="post")
    with torch.no_grad():
        expected = torch.cat(
            [
                model.pooled_layer_states(**{k: v for k, v in b.items() if k != "labels"}, stage="post")
                for b in batches
            ],
            dim=1,
        )
    torch.testing.assert_close(post, expected, rtol=0, atol=0)
    assert layer_representations(model, batches).shape[-1] == 32
    callback = RepresentationDynamicsCallback(batches, stage="post", plot=False)
    from transformers import TrainerControl, TrainerState, TrainingArguments

    state = TrainerState()
    state.global_step, state.epoch, state.is_world_process_zero = 0, 0.0, True
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    written = json.loads((tmp_path / "representation_dynamics.json").read_text())
    assert written["stage"] == "post"
    assert torch.equal(callback._initial, post)


def test_cli_analyze_stage(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    model_dir = tmp_path / "model"
    _, model = head_model("mean")
    model.save_pretrained(model_dir)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.tsv"
    rows = write_texts(data, num_samples=12)
    output = tmp_path / "post"
    main(["analyze", str(model_dir), "--dataset", str(data), "--output", str(output), "--stage", "post"])
    results = json.loads((output / "similarity.json").read_text())
    assert results["stage"] == "post"
    batch = tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        reps = model.pooled_layer_states(**batch, stage="post").double().numpy()
    np.testing.assert_allclose(np.array(results["cos"]), numpy_cos_matrix(reps), atol=1e-5)
    assert not np.allclose(np.array(results["cos"]), cosine_similarity_matrix(model.pooled_layer_states(**batch)))
    saturation = json.loads((output / "saturation.json").read_text())
    assert "projection head" in saturation["representation"]
    with pytest.raises(ValueError, match="`--stage post` reads the vectors the classifier reads"):
        main(["analyze", str(model_dir), "--dataset", str(data), "--output", str(output), "--stage", "post",
              "--pooling", "cls"])  # fmt: skip


def test_model_card_lists_the_projection_head():
    from hf_aligned import build_model_card

    card = str(build_model_card(AlignedConfig(base_config=tiny_base_config("bert"), projection_head=HEAD)))
    assert (
        "- **Projection head:** 2 linear layer(s) of width 16, each followed by `gelu`, before the classification layer"
    ) in card
    assert "Projection head" not in str(build_model_card(AlignedConfig(base_config=tiny_base_config("bert"))))
