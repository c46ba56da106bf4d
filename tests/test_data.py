"""Streaming datasets through a model in batches (shared by similarity, probes and calibration)."""

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding

from hf_aligned.data import iter_model_batches
from tests.testing_utils import tiny_model, tiny_tokenizer


def test_dataset_rows_are_padded_filtered_and_labels_returned(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    texts = ["w1 w2 w3", "w4", "w5 w6", "w7 w8 w9 w10", "w11"]
    dataset = Dataset.from_dict({**tokenizer(texts), "label": [0, 1, 2, 0, 1], "text": texts})
    model = tiny_model("bert")
    batches = list(iter_model_batches(model, dataset, batch_size=2, collate_fn=DataCollatorWithPadding(tokenizer)))
    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    assert set(batches[0][0]) == {"input_ids", "attention_mask", "token_type_ids"}  # `text` and labels left out
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 1, 2, 0, 1]
    first = tokenizer(texts[:2], padding=True, return_tensors="pt")
    assert torch.equal(batches[0][0]["input_ids"], first["input_ids"])
    assert [
        len(labels) for _, labels in iter_model_batches(model, dataset, 2, DataCollatorWithPadding(tokenizer), 3)
    ] == [2, 1]


def test_iterables_of_mappings_pass_through_and_other_data_is_rejected():
    model = tiny_model("bert")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "unused": torch.zeros(2)}
    inputs, labels = next(iter(iter_model_batches(model, [batch])))
    assert inputs.keys() == {"input_ids"} and labels is None
    with pytest.raises(TypeError, match=r"`data` must be a dataset or an iterable of dict batches, got int"):
        list(iter_model_batches(model, 42))
    with pytest.raises(TypeError, match=r"Expected dict batches \(input name -> tensor\), got list"):
        list(iter_model_batches(model, [[1, 2]]))
