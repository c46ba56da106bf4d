"""AlignedForSequenceClassification does what transformers' own classifiers do with the same habits: plain calls of
regression and multi-label models, `return_dict=False`, config overrides in `from_pretrained`, loading info, and
settings that cannot hold are refused instead of silently changed."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertModel,
    GPT2Model,
    pipeline,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_aligned import AlignedConfig, AlignedForCausalLM, AlignedForSequenceClassification, ExitConfig

from .testing_utils import NUM_LAYERS, tiny_base_config, tiny_inputs, tiny_model, tiny_tokenizer

TEXTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10"]


@pytest.mark.parametrize(
    "settings",
    [
        {"num_labels": 1},
        {"num_labels": 1, "problem_type": "regression"},
        {"problem_type": "multi_label_classification"},
    ],
)
def test_regression_and_multi_label_models_answer_plain_calls_and_pipelines(settings, tmp_path):
    model = tiny_model("bert", **settings)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        full = model(**inputs, output_layer_logits=True).logits
        served = model(**inputs)
    torch.testing.assert_close(served.logits, full)
    assert served.exit_layers is None  # exits off: a plain call is the full forward, batch first
    model.exit_config = ExitConfig(rule="fixed", exit_layer=NUM_LAYERS - 1)  # a rule that reads no probabilities
    with torch.no_grad():
        served = model(**inputs)
        expected = model(**inputs, output_layer_logits=True).layer_logits[NUM_LAYERS - 2]
    torch.testing.assert_close(served.logits, expected)
    assert served.exit_layers.tolist() == [NUM_LAYERS - 1] * 3
    model.exit_config = ExitConfig()
    classify = pipeline("text-classification", model=model, tokenizer=tiny_tokenizer(tmp_path), top_k=None)
    scores = classify(TEXTS, function_to_apply="none")
    tokenizer = tiny_tokenizer(tmp_path)
    for text, result in zip(TEXTS, scores):
        with torch.no_grad():
            expected = model(**tokenizer(text, return_tensors="pt"), output_layer_logits=True).logits[0]
        got = {row["label"]: row["score"] for row in result}
        assert [got[model.config.id2label[index]] for index in range(len(expected))] == pytest.approx(
            expected.tolist(), abs=1e-5
        )
    # Exits that read class probabilities are still refused for such a model, by name.
    model.exit_config = ExitConfig(threshold=0.9)
    with pytest.raises(ValueError, match="reads class probabilities"), torch.no_grad():
        model(**inputs)


def test_a_pooler_with_another_pooling_is_refused():
    for pooling in ("mean", "last"):
        with pytest.raises(ValueError, match=rf"`use_pooler=True` reads the first token.*pooling='{pooling}'"):
            AlignedConfig(base_config=tiny_base_config("bert"), pooling=pooling, use_pooler=True)
    assert AlignedConfig(base_config=tiny_base_config("bert"), pooling="mean").use_pooler is None


def test_return_dict_false_gives_a_tuple_like_transformers():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs, labels=labels, output_hidden_states=True, output_attentions=True, return_dict=False)
        served = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected.to_tuple())
    assert len(expected.hidden_states) == NUM_LAYERS + 1 and expected.attentions is not None
    for got, wanted in zip(as_tuple, expected.to_tuple()):
        if isinstance(wanted, tuple):
            for got_item, wanted_item in zip(got, wanted):
                torch.testing.assert_close(got_item, wanted_item)
        else:
            torch.testing.assert_close(got, wanted)
    assert isinstance(served, tuple) and len(served) == 1  # exits off: the last layer's logits
    torch.testing.assert_close(served[0], expected.logits)
    model.exit_config = ExitConfig(rule="fixed", exit_layer=2)
    with torch.no_grad():
        served = model(**inputs, return_dict=False)
    assert isinstance(served, tuple) and len(served) == 2  # logits and exit layers
    assert served[1].tolist() == [2, 2, 2]


def test_from_pretrained_applies_config_overrides_like_auto_models(tmp_path):
    plain = BertForSequenceClassification(tiny_base_config("bert"))
    plain.save_pretrained(tmp_path / "plain")
    aligned = tiny_model("bert")
    aligned.save_pretrained(tmp_path / "aligned")
    overrides = {"hidden_dropout_prob": 0.0, "use_cache": False, "attention_probs_dropout_prob": 0.25}
    plain_loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", **overrides)
    expected, plain_dropout = plain_loaded.config, plain_loaded.dropout.p
    for path in (tmp_path / "plain", tmp_path / "aligned"):
        model = AlignedForSequenceClassification.from_pretrained(path, **overrides)
        for key, value in overrides.items():
            assert getattr(model.config.base_config, key) == getattr(expected, key) == value, (path, key)
        # The classifier's dropout follows the overridden base config, as plain BERT's does (it was derived from it).
        assert model.classifier.heads[0].dropout.p == plain_dropout == 0.0, path
        with pytest.raises(TypeError, match="not_a_setting"):
            AlignedForSequenceClassification.from_pretrained(path, not_a_setting=1)
    with pytest.raises(TypeError, match="not_a_setting"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", not_a_setting=1)


def test_causal_lm_from_pretrained_applies_config_overrides_like_auto_models(tmp_path):
    AlignedForCausalLM.from_config(tiny_base_config("gpt2")).save_pretrained(tmp_path)
    overrides = {"resid_pdrop": 0.0, "use_cache": False, "embd_pdrop": 0.3}
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, **overrides).config
    model = AlignedForCausalLM.from_pretrained(tmp_path, layer_weights="last", **overrides)
    for key, value in overrides.items():
        assert getattr(model.config, key) == getattr(expected, key) == value, key
    assert model.alignment.layer_weights == "last"
    with pytest.raises(TypeError, match="not_a_setting"):
        AlignedForCausalLM.from_pretrained(tmp_path, not_a_setting=1)


def test_truncate_never_gives_a_config_from_pretrained_refuses(tmp_path):
    model = tiny_model("bert", num_layers=3, layer_weights=[1.0, 0.0, 1.0], classifier_update="last")
    with pytest.raises(ValueError, match=r"truncate\(2\).*classifier_update='last'"):
        model.truncate(2)
    model = tiny_model("bert", aligned_layers=[1, 3, 4], layer_weights="uniform")
    truncated = model.truncate(2)
    assert truncated.config.aligned_layers == [1]
    truncated.save_pretrained(tmp_path)
    assert AlignedForSequenceClassification.from_pretrained(tmp_path).config.resolved_layer_weights == [1.0, 0.0]


@pytest.mark.parametrize("source", ["aligned", "plain"])
def test_output_loading_info_still_reads_the_exit_config(source, tmp_path):
    model = tiny_model("bert")
    model.exit_config = ExitConfig(threshold=0.75)
    model.save_pretrained(tmp_path / "aligned")
    BertForSequenceClassification(tiny_base_config("bert")).save_pretrained(tmp_path / "plain")
    loaded, info = AlignedForSequenceClassification.from_pretrained(tmp_path / source, output_loading_info=True)
    assert isinstance(loaded, AlignedForSequenceClassification)
    assert sorted(info) == ["error_msgs", "mismatched_keys", "missing_keys", "unexpected_keys"]
    if source == "aligned":
        assert loaded.exit_config.threshold == 0.75
        assert json.loads((tmp_path / "aligned" / "exit_config.json").read_text())["threshold"] == 0.75
        assert not info["missing_keys"]
    else:
        assert sorted(info["missing_keys"]) == [
            "classifier.heads.0.out_proj.bias",
            "classifier.heads.0.out_proj.weight",
        ]


def test_a_list_as_input_ids_is_a_clear_error():
    model = tiny_model("bert")
    with pytest.raises(TypeError, match=r"got `input_ids` as a list; pass a tensor.*return_tensors='pt'"):
        model(input_ids=[[2, 5, 7]])
    with pytest.raises(TypeError, match=r"early_exit_predict\(\) got `input_ids` as a list"):
        model.early_exit_predict(input_ids=[[2, 5, 7]])


def test_wrapping_a_base_model_takes_it_over_as_documented():
    base = BertModel(tiny_base_config("bert"))
    norm, pooler = base.embeddings.LayerNorm, base.pooler
    model = AlignedForSequenceClassification(AlignedConfig(base_config=base.config, num_labels=3), base_model=base)
    assert model.backbone is base and model.classifier.heads[0].pooler is pooler and base.pooler is None
    assert base.embeddings.LayerNorm is norm  # a post-norm BERT has no final norm to move
    decoder = GPT2Model(tiny_base_config("gpt2"))
    final_norm = decoder.ln_f
    model = AlignedForSequenceClassification(AlignedConfig(base_config=decoder.config), base_model=decoder)
    assert model.classifier.heads[0].norm is final_norm and isinstance(decoder.ln_f, torch.nn.Identity)


def test_reload_keeps_the_weights_bit_for_bit(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved)


def test_an_explicit_classifier_dropout_survives_a_base_dropout_override(tmp_path):
    tiny_model("bert", classifier_dropout=0.3).save_pretrained(tmp_path)
    model = AlignedForSequenceClassification.from_pretrained(tmp_path, hidden_dropout_prob=0.0)
    assert model.config.base_config.hidden_dropout_prob == 0.0
    assert model.config.classifier_dropout == model.classifier.heads[0].dropout.p == 0.3
    model = AlignedForSequenceClassification.from_pretrained(tmp_path, hidden_dropout_prob=0.0, classifier_dropout=0.2)
    assert model.classifier.heads[0].dropout.p == 0.2
    tiny_model("bert").save_pretrained(tmp_path / "derived")  # its classifier dropout came from hidden_dropout_prob
    model = AlignedForSequenceClassification.from_pretrained(
        tmp_path / "derived", hidden_dropout_prob=0.0, classifier_dropout=0.2
    )
    assert model.classifier.heads[0].dropout.p == 0.2


def test_base_config_overrides_are_validated_with_the_alignment_settings(tmp_path):
    BertForSequenceClassification(tiny_base_config("bert")).save_pretrained(tmp_path / "plain")
    tiny_model("bert").save_pretrained(tmp_path / "aligned")
    expected = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", num_hidden_layers=2)
    model = AlignedForSequenceClassification.from_pretrained(tmp_path / "aligned", num_hidden_layers=2)
    assert model.num_layers == model.config.num_layers == expected.config.num_hidden_layers == 2
    assert len(model.config.resolved_layer_weights) == 2
    with torch.no_grad():
        output = model(**tiny_inputs("bert"), labels=torch.tensor([0, 2, 1]), output_layer_logits=True)
    assert output.layer_logits.shape[0] == 2 and torch.isfinite(output.loss)
    # Settings that do not fit the overridden depth are refused by name, not loaded into a model that fails later.
    tiny_model("bert", layer_weights=[1.0, 2.0, 3.0, 4.0]).save_pretrained(tmp_path / "weighted")
    with pytest.raises(ValueError, match="`layer_weights` has 4 entries but the model has 2 layers"):
        AlignedForSequenceClassification.from_pretrained(tmp_path / "weighted", num_hidden_layers=2)
    with pytest.raises(ValueError, match="`layer_weights` has 1 entries but the model has 4 layers"):
        AlignedForSequenceClassification.from_pretrained(tmp_path / "aligned", layer_weights=[1.0])


def test_num_layers_is_refused_by_name_with_the_keyword_to_use(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"`num_layers` is a read-only.*`num_hidden_layers`.*truncate"):
        AlignedForSequenceClassification.from_pretrained(tmp_path, num_layers=2)


def test_output_flags_default_to_the_config_like_transformers(tmp_path):
    BertForSequenceClassification(tiny_base_config("bert")).save_pretrained(tmp_path / "plain")
    tiny_model("bert").save_pretrained(tmp_path / "aligned")
    flags = {"output_hidden_states": True, "output_attentions": True}
    inputs = tiny_inputs("bert")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", **flags).eval()
    aligned = AlignedForSequenceClassification.from_pretrained(tmp_path / "aligned", **flags).eval()
    with torch.no_grad():
        expected, output = plain(**inputs), aligned(**inputs)
    assert len(output.hidden_states) == len(expected.hidden_states) == NUM_LAYERS + 1
    assert len(output.attentions) == len(expected.attentions) == NUM_LAYERS
    aligned = AlignedForSequenceClassification.from_pretrained(tmp_path / "aligned").eval()
    with torch.no_grad():
        assert aligned(**inputs).hidden_states is None
        aligned.config.output_hidden_states = True
        assert len(aligned(**inputs).hidden_states) == NUM_LAYERS + 1
        assert aligned(**inputs, output_hidden_states=False).hidden_states is None


def test_return_dict_false_puts_hidden_states_and_attentions_where_transformers_does(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_base_config("bert")).save_pretrained(tmp_path)
    plain = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    aligned = AlignedForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs, labels = tiny_inputs("bert"), torch.tensor([0, 1, 1])
    flags = {"labels": labels, "output_hidden_states": True, "output_attentions": True, "return_dict": False}
    with torch.no_grad():
        expected, output = plain(**inputs, **flags), aligned(**inputs, **flags)
    assert len(expected) == 4  # loss, logits, hidden_states, attentions
    assert output[0].shape == expected[0].shape == () and output[1].shape == expected[1].shape
    for position in (2, 3):  # the same backbone: the same hidden states and attentions, at the same positions
        assert len(output[position]) == len(expected[position])
        for got, wanted in zip(output[position], expected[position]):
            torch.testing.assert_close(got, wanted)
    assert output[4].shape == (NUM_LAYERS,)  # the aligned extras follow: the per-layer losses


@pytest.mark.parametrize(
    "settings",
    [{"layer_weights": "last"}, {"aligned_layers": [3, 4]}, {"layer_weights": [0.0, 0.0, 1.0, 1.0]}],
)
def test_truncating_before_every_trained_layer_records_last_layer_weights_and_warns(settings, tmp_path):
    model = tiny_model("bert", **settings)
    inputs = tiny_inputs("bert")
    logger = logging.get_logger("hf_aligned.checkpoints")
    for depth in (1, 2):
        with CaptureLogger(logger) as captured:
            truncated = model.truncate(depth)
        trained = r"\[4\]" if settings == {"layer_weights": "last"} else r"\[3, 4\]"
        assert re.search(
            rf"truncate\({depth}\) keeps none of the layers trained with a loss \({trained}\)", captured.out
        )
        assert truncated.config.layer_weights == "last" and truncated.config.aligned_layers is None
        assert truncated.config.resolved_layer_weights == [0.0] * (depth - 1) + [1.0]
        truncated.save_pretrained(tmp_path / str(depth))
        reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path / str(depth))
        with torch.no_grad():
            expected = model(**inputs, output_layer_logits=True).layer_logits[depth - 1]
            torch.testing.assert_close(reloaded(**inputs).logits, expected)
    if "aligned_layers" in settings:  # a cut that keeps a trained layer keeps its settings, with no warning
        with CaptureLogger(logger) as captured:
            kept = model.truncate(3)
        assert captured.out == "" and kept.config.aligned_layers == [3]
