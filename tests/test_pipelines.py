"""AlignedTextClassificationPipeline: transformers' text-classification pipeline that truncates long texts and can
report each text's exit layer."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

from hf_aligned import AlignedTextClassificationPipeline, ExitConfig

from .test_serving import TEXTS, confident_model
from .testing_utils import tiny_tokenizer

LONG_TEXT = " ".join(f"w{index % 90}" for index in range(700))  # longer than the 512 positions of the tiny BERT


def test_long_texts_are_truncated_to_the_tokenizers_length(tmp_path):
    model = confident_model("bert")
    tokenizer = tiny_tokenizer(tmp_path)
    with pytest.raises((IndexError, RuntimeError)):
        pipeline("text-classification", model=model, tokenizer=tokenizer)(LONG_TEXT)
    tokenizer.model_max_length = 128
    result = pipeline("aligned-text-classification", model=model, tokenizer=tokenizer)(LONG_TEXT)
    cut = tokenizer(LONG_TEXT, truncation=True, return_tensors="pt")
    assert cut["input_ids"].shape[1] == 128
    with torch.no_grad():
        logits = model(**cut, early_exit=False).logits[0]
    assert result == [{"label": model.config.id2label[logits.argmax().item()], "score": pytest.approx(
        logits.softmax(-1).max().item(), abs=1e-5)}]  # fmt: skip
    no_cut = AlignedTextClassificationPipeline(model=model, tokenizer=tokenizer, truncation=False)
    with pytest.raises((IndexError, RuntimeError)):
        no_cut(LONG_TEXT)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_return_exit_layer_adds_each_texts_exit_layer(tmp_path, batch_size):
    model = confident_model("bert")
    model.exit_config = ExitConfig(threshold=0.9)
    tokenizer = tiny_tokenizer(tmp_path)
    classify = pipeline("aligned-text-classification", model=model, tokenizer=tokenizer, return_exit_layer=True)
    results = classify(TEXTS, batch_size=batch_size)
    expected = [model.early_exit_predict(**tokenizer(text, return_tensors="pt")) for text in TEXTS]
    assert [result["exit_layer"] for result in results] == [out.exit_layers.item() for out in expected]
    assert min(result["exit_layer"] for result in results) < model.num_layers, "the test needs early exits"
    top = classify(TEXTS[0], top_k=None)
    assert {row["exit_layer"] for row in top} == {expected[0].exit_layers.item()} and len(top) == 3
    assert "exit_layer" not in classify(TEXTS[0], return_exit_layer=False)[0]
    # Asked for, exit layers are reported whatever a plain call would run: with exits off every text leaves last.
    model.exit_config = ExitConfig()
    assert [result["exit_layer"] for result in classify(TEXTS, batch_size=batch_size)] == [model.num_layers] * len(
        TEXTS
    )
    assert "exit_layer" not in pipeline("aligned-text-classification", model=model, tokenizer=tokenizer)(TEXTS[0])[0]


def test_a_tokenizer_without_a_length_truncates_to_the_models_position_limit(tmp_path):
    model = confident_model("bert")
    tokenizer = tiny_tokenizer(tmp_path)
    assert tokenizer.model_max_length > 10**12  # transformers' placeholder: no length saved
    limit = model.config.base_config.max_position_embeddings
    assert len(tokenizer(LONG_TEXT)["input_ids"]) > limit
    result = pipeline("aligned-text-classification", model=model, tokenizer=tokenizer)(LONG_TEXT)
    cut = tokenizer(LONG_TEXT, truncation=True, max_length=limit, return_tensors="pt")
    assert cut["input_ids"].shape[1] == limit
    with torch.no_grad():
        logits = model(**cut, early_exit=False).logits[0]
    assert result[0]["label"] == model.config.id2label[logits.argmax().item()]
    assert result[0]["score"] == pytest.approx(logits.softmax(-1).max().item(), abs=1e-5)
    shorter = pipeline("aligned-text-classification", model=model, tokenizer=tokenizer, max_length=16)
    assert shorter._preprocess_params["max_length"] == 16 and shorter(LONG_TEXT)[0]["label"] in model.config.label2id


def test_a_tokenizer_and_a_model_without_a_length_ask_for_max_length(tmp_path, monkeypatch):
    from hf_aligned import pipelines

    model = confident_model("bert")
    monkeypatch.setattr(pipelines, "position_limit", lambda model: None)  # a family with no position limit
    tokenizer = tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"`model_max_length` is unset.*pass `max_length=\.\.\.`"):
        pipeline("aligned-text-classification", model=model, tokenizer=tokenizer)
    assert AlignedTextClassificationPipeline(model=model, tokenizer=tokenizer, truncation=False) is not None


def test_a_roberta_model_truncates_to_its_usable_positions(tmp_path):
    from transformers import RobertaConfig

    from hf_aligned import AlignedConfig, AlignedForSequenceClassification
    from hf_aligned.pipelines import position_limit

    config = RobertaConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1)  # fmt: skip
    model = AlignedForSequenceClassification(AlignedConfig(base_config=config, num_labels=2)).eval()
    assert position_limit(model) == 40 - 1 - 1  # RoBERTa's positions start after the padding index
    tokenizer = tiny_tokenizer(tmp_path)
    result = pipeline("aligned-text-classification", model=model, tokenizer=tokenizer)(LONG_TEXT)
    assert result[0]["label"] in model.config.label2id
