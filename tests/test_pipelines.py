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
    model.train()
    with pytest.raises(ValueError, match=r"`return_exit_layer=True` needs the model's exit layers.*model.eval\(\)"):
        classify(TEXTS[0])
