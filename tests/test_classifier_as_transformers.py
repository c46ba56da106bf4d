"""AlignedForSequenceClassification does what transformers' own classifiers do with the same habits: plain calls of
regression and multi-label models, `return_dict=False`, config overrides in `from_pretrained`, loading info, and
settings that cannot hold are refused instead of silently changed."""

from __future__ import annotations

import json

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
        full = model(**inputs, early_exit=False).logits
        served = model(**inputs)
    torch.testing.assert_close(served.logits, full)
    assert served.exit_layers.tolist() == [NUM_LAYERS] * 3
    classify = pipeline("text-classification", model=model, tokenizer=tiny_tokenizer(tmp_path), top_k=None)
    scores = classify(TEXTS, function_to_apply="none")
    tokenizer = tiny_tokenizer(tmp_path)
    for text, result in zip(TEXTS, scores):
        with torch.no_grad():
            expected = model(**tokenizer(text, return_tensors="pt"), early_exit=False).logits[0]
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
    assert isinstance(served, tuple) and len(served) == 2  # logits and exit layers


def test_from_pretrained_applies_config_overrides_like_auto_models(tmp_path):
    plain = BertForSequenceClassification(tiny_base_config("bert"))
    plain.save_pretrained(tmp_path / "plain")
    aligned = tiny_model("bert")
    aligned.save_pretrained(tmp_path / "aligned")
    overrides = {"hidden_dropout_prob": 0.0, "use_cache": False, "attention_probs_dropout_prob": 0.25}
    expected = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain", **overrides).config
    for path in (tmp_path / "plain", tmp_path / "aligned"):
        model = AlignedForSequenceClassification.from_pretrained(path, **overrides)
        for key, value in overrides.items():
            assert getattr(model.config.base_config, key) == getattr(expected, key) == value, (path, key)
        assert model.classifier.heads[0].dropout.p == (0.0 if path.name == "plain" else 0.1)
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
    model = tiny_model("bert", aligned_layers=[3, 4])
    with pytest.raises(ValueError, match=r"truncate\(2\) keeps none of the aligned layers \[3, 4\]"):
        model.truncate(2)
    model = tiny_model("bert", layer_weights=[0.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"truncate\(2\) keeps none of the aligned layers \[3, 4\]"):
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
