"""evaluate() gives clear metrics, never a bare StopIteration, when nothing is counted or a loss diverged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import EvalPrediction, LlamaForCausalLM

from hf_aligned import AlignedForCausalLM, AlignedTrainer, CausalLayerwiseMetrics, minimal_depth

from .test_trainer import toy_dataset, training_args
from .testing_utils import NUM_LAYERS, VOCAB_SIZE, tiny_base_config, tiny_model


def test_minimal_depth_of_an_undefined_last_accuracy_is_a_clear_error():
    with pytest.raises(ValueError, match=r"last layer's accuracy is nan"):
        minimal_depth([0.5, float("nan")])


def test_evaluate_with_every_label_ignored_reports_nan_accuracy_and_no_depth(tmp_path):
    dataset = toy_dataset(6).map(lambda row: {"labels": -100})
    trainer = AlignedTrainer(tiny_model("bert"), training_args(tmp_path), eval_dataset=dataset)
    metrics = trainer.evaluate()
    for layer in range(1, NUM_LAYERS + 1):
        assert math.isnan(metrics[f"eval_layer_{layer}_accuracy"])
    assert math.isnan(metrics["eval_accuracy"]) and "eval_minimal_depth" not in metrics


def test_causal_evaluate_with_a_nan_loss_reports_nan_and_no_depth(tmp_path):
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_base_config("llama")).eval()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    ids = torch.randint(3, VOCAB_SIZE, (4, 6), generator=torch.Generator().manual_seed(1)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = AlignedTrainer(model, training_args(tmp_path, per_device_eval_batch_size=2), eval_dataset=dataset)
    metrics = trainer.evaluate()
    assert math.isnan(metrics["eval_perplexity"]) and math.isnan(metrics[f"eval_layer_{NUM_LAYERS}_loss"])
    assert "eval_minimal_depth" not in metrics


def test_causal_loss_with_every_label_ignored_is_nan_as_the_plain_family():
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_base_config("llama")).eval()
    plain = LlamaForCausalLM(model.config).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(3, VOCAB_SIZE, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    with torch.no_grad():
        expected = plain(input_ids=ids, labels=labels).loss
        output = model(input_ids=ids, labels=labels, output_layer_agreement=True)
    assert math.isnan(expected)
    assert math.isnan(output.loss)
    assert all(math.isnan(value) for value in output.layer_losses.tolist())
    assert all(math.isnan(value) for value in output.layer_agreement.tolist())


def test_causal_evaluate_with_every_label_ignored_reports_nan_and_no_depth(tmp_path):
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_base_config("llama")).eval()
    ids = torch.randint(3, VOCAB_SIZE, (4, 6), generator=torch.Generator().manual_seed(1)).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": [[-100] * 6 for _ in ids]})
    trainer = AlignedTrainer(model, training_args(tmp_path, per_device_eval_batch_size=2), eval_dataset=dataset)
    metrics = trainer.evaluate()
    for layer in range(1, NUM_LAYERS + 1):
        for name in ("loss", "perplexity", "agreement"):
            assert math.isnan(metrics[f"eval_layer_{layer}_{name}"]), (layer, name)
    assert math.isnan(metrics["eval_perplexity"]) and "eval_minimal_depth" not in metrics


def test_causal_layerwise_metrics_with_no_counted_token_are_nan():
    sums = np.zeros((3, NUM_LAYERS, 2))
    metrics = CausalLayerwiseMetrics()(EvalPrediction(predictions=sums, label_ids=np.zeros(3)))
    assert math.isnan(metrics["perplexity"]) and "minimal_depth" not in metrics
    assert math.isnan(metrics[f"layer_{NUM_LAYERS}_agreement"])
