"""AlignedTrainer and AlignedTrainingArguments: loss, gradient accumulation, logging, layer-wise evaluation, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    BertForSequenceClassification,
    EvalPrediction,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_aligned import (
    AlignedConfig,
    AlignedForSequenceClassification,
    AlignedTrainer,
    AlignedTrainingArguments,
    ExitConfig,
    LayerwiseMetrics,
    format_layer_table,
    minimal_depth,
)
from hf_aligned.distributed import check_launch
from tests.testing_utils import NUM_LAYERS, tiny_base_config, tiny_inputs, tiny_model

NUM_SAMPLES = 24


def deterministic_model(seed: int = 0, **aligned_kwargs) -> AlignedForSequenceClassification:
    """A tiny BERT aligned model without dropout, so different batchings give the same gradients."""
    base = tiny_base_config("bert")
    base.hidden_dropout_prob = base.attention_probs_dropout_prob = 0.0
    aligned_kwargs.setdefault("num_labels", 3)
    torch.manual_seed(seed)
    return AlignedForSequenceClassification(AlignedConfig(base_config=base, classifier_dropout=0.0, **aligned_kwargs))


def toy_dataset(num_samples: int = NUM_SAMPLES, seed: int = 0) -> Dataset:
    """Token sequences whose label is the first token id modulo 3."""
    inputs = tiny_inputs("bert", batch_size=num_samples, seq_len=7, seed=seed)
    labels = inputs["input_ids"][:, 0] % 3
    return Dataset.from_dict({**{key: value.tolist() for key, value in inputs.items()}, "labels": labels.tolist()})


def as_batch(dataset: Dataset) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(dataset[key]) for key in dataset.column_names}


def training_args(tmp_path, **kwargs) -> AlignedTrainingArguments:
    defaults = {
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 0,
        "learning_rate": 1e-2,
    }
    return AlignedTrainingArguments(output_dir=str(tmp_path), **{**defaults, **kwargs})


class LogRecorder(TrainerCallback):
    """Keeps every log the Trainer sends to its callbacks (what TensorBoard, trackio, ... receive)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def direct_layer_outputs(model, dataset):
    model.eval()
    with torch.no_grad():
        return model(**as_batch(dataset), output_layer_logits=True)


def direct_layer_accuracies(model, dataset) -> list[float]:
    predictions = direct_layer_outputs(model, dataset).layer_logits.argmax(-1)
    return (predictions == torch.tensor(dataset["labels"])).double().mean(dim=1).tolist()


def assert_layer_accuracies(metrics, model, dataset) -> None:
    """`evaluate()`'s per-layer accuracies equal those of a direct forward pass over the whole data set."""
    for layer, accuracy in enumerate(direct_layer_accuracies(model, dataset), start=1):
        assert metrics[f"eval_layer_{layer}_accuracy"] == pytest.approx(accuracy), layer


# ---------------------------------------------------------------------------------------------------------------
# Loss, gradient accumulation and per-layer loss logging
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_2x4_matches_batch_8(tmp_path):
    # Plain SGD without clipping: a missing (or doubled) 1/GA scaling of the loss changes the size of the update,
    # which Adam's normalization would hide.
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = deterministic_model()
        args = training_args(
            tmp_path / str(batch_size),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            max_grad_norm=0.0,
            learning_rate=0.5,
            max_steps=3,
            logging_steps=1,
        )
        trainer = AlignedTrainer(model, args, train_dataset=toy_dataset())
        trainer.train()
        results.append((model.state_dict(), [log for log in trainer.state.log_history if "loss" in log]))
    (full_state, full_logs), (accumulated_state, accumulated_logs) = results
    initial = deterministic_model().state_dict()
    key = "classifier.heads.0.out_proj.weight"
    assert not torch.allclose(full_state[key], initial[key])
    for name, value in full_state.items():
        torch.testing.assert_close(accumulated_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert len(full_logs) == len(accumulated_logs) == 3
    for full, accumulated in zip(full_logs, accumulated_logs):
        for name in ["loss", *(f"layer_{layer}_loss" for layer in range(1, NUM_LAYERS + 1))]:
            assert accumulated[name] == pytest.approx(full[name], rel=1e-5), name


def test_a_diverged_nan_layer_loss_is_logged_as_nan_not_dropped(tmp_path):
    model = deterministic_model(layer_weights="uniform")

    def diverge_layer_2(module, args, kwargs, output):
        output.layer_losses = output.layer_losses.clone().index_fill(0, torch.tensor([1]), float("nan"))
        return output

    model.register_forward_hook(diverge_layer_2, with_kwargs=True)
    args = training_args(
        tmp_path, learning_rate=0.0, per_device_train_batch_size=12, gradient_accumulation_steps=2, max_steps=1
    )
    args.logging_steps = 1
    trainer = AlignedTrainer(model, args, train_dataset=toy_dataset())
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    expected = direct_layer_outputs(model, toy_dataset()).layer_losses.tolist()
    assert np.isnan(log["layer_2_loss"])
    assert [log[f"layer_{layer}_loss"] for layer in (1, 3, 4)] == pytest.approx(
        [expected[0], expected[2], expected[3]], rel=1e-5
    )


@pytest.mark.parametrize("layer_weights", ["uniform", [0.1, 0.2, 0.3, 0.4], "last"])
def test_logged_layer_losses_match_the_model_and_combine_to_the_loss(tmp_path, layer_weights):
    # Learning rate 0 keeps the model fixed, so every logged value can be recomputed on the whole data set: two
    # micro-batches of 12 (gradient accumulation) average to the full-batch mean.
    model = deterministic_model(layer_weights=layer_weights)
    recorder = LogRecorder()
    args = training_args(
        tmp_path, learning_rate=0.0, per_device_train_batch_size=12, gradient_accumulation_steps=2, max_steps=2
    )
    args.logging_steps = 1
    trainer = AlignedTrainer(model, args, train_dataset=toy_dataset(), callbacks=[recorder])
    trainer.train()
    expected = direct_layer_outputs(model, toy_dataset()).layer_losses.tolist()
    weights = model.config.resolved_layer_weights
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        logged = [log[f"layer_{layer}_loss"] for layer in range(1, NUM_LAYERS + 1)]
        assert logged == pytest.approx(expected, rel=1e-5)
        assert sum(weight * loss for weight, loss in zip(weights, logged)) == pytest.approx(log["loss"], rel=1e-5)
    assert [log for log in trainer.state.log_history if "loss" in log] == [
        {**log, "step": step} for step, log in enumerate(train_logs, start=1)
    ]


def test_layer_losses_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = training_args(tmp_path, report_to="tensorboard", max_steps=2, per_device_train_batch_size=8, eval_steps=2)
    args.logging_steps, args.eval_strategy = 1, "steps"
    trainer = AlignedTrainer(deterministic_model(), args, train_dataset=toy_dataset(), eval_dataset=toy_dataset(8, 1))
    trainer.train()
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/layer_{layer}_loss" for layer in range(1, NUM_LAYERS + 1)} <= tags
    assert {f"eval/layer_{layer}_accuracy" for layer in range(1, NUM_LAYERS + 1)} <= tags
    assert {"eval/minimal_depth", "train/loss"} <= tags
    assert [event.step for event in events.Scalars("train/layer_1_loss")] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise evaluation and prediction
# ---------------------------------------------------------------------------------------------------------------


def mean_top_score(eval_pred) -> dict[str, float]:
    """A user metric: the mean of the highest logit, and how many samples it saw."""
    predictions, labels = eval_pred
    return {"mean_top_score": float(predictions.max(axis=-1).mean()), "count": len(labels)}


def test_evaluate_reports_every_layer_like_a_direct_computation(tmp_path):
    dataset = toy_dataset(25, seed=3)
    model = deterministic_model(seed=1)
    # Ragged batches (7, 7, 7, 4) moved to the CPU every 2 steps: concatenation must keep samples on dim 0.
    args = training_args(
        tmp_path, per_device_eval_batch_size=7, eval_accumulation_steps=2, minimal_depth_tolerance=0.05
    )
    trainer = AlignedTrainer(model, args, eval_dataset=dataset, compute_metrics=mean_top_score)
    metrics = trainer.evaluate()

    assert_layer_accuracies(metrics, model, dataset)
    accuracies = direct_layer_accuracies(model, dataset)
    outputs = direct_layer_outputs(model, dataset)
    for layer in range(1, NUM_LAYERS + 1):
        assert metrics[f"eval_layer_{layer}_loss"] == pytest.approx(outputs.layer_losses[layer - 1].item(), rel=1e-5)
        top = outputs.layer_logits[layer - 1].max(dim=-1).values.mean().item()
        assert metrics[f"eval_layer_{layer}_mean_top_score"] == pytest.approx(top, rel=1e-5)
        assert metrics[f"eval_layer_{layer}_count"] == 25
    assert metrics["eval_accuracy"] == metrics[f"eval_layer_{NUM_LAYERS}_accuracy"]
    assert metrics["eval_mean_top_score"] == metrics[f"eval_layer_{NUM_LAYERS}_mean_top_score"]
    expected_depth = next(layer for layer, acc in enumerate(accuracies, 1) if acc >= accuracies[-1] - 0.05 - 1e-12)
    assert metrics["eval_minimal_depth"] == expected_depth


def test_eval_loss_stays_the_aligned_loss(tmp_path):
    dataset = toy_dataset(24, seed=3)
    model = deterministic_model(seed=1, layer_weights="uniform")
    trainer = AlignedTrainer(model, training_args(tmp_path, per_device_eval_batch_size=6), eval_dataset=dataset)
    metrics = trainer.evaluate()
    outputs = direct_layer_outputs(model, dataset)
    assert metrics["eval_loss"] == pytest.approx(outputs.loss.item(), rel=1e-5)
    assert metrics["eval_loss"] != pytest.approx(outputs.layer_losses[-1].item(), rel=1e-5)


def test_predict_returns_per_layer_logits_batch_first(tmp_path):
    dataset = toy_dataset(10)
    model = deterministic_model()
    trainer = AlignedTrainer(model, training_args(tmp_path, per_device_eval_batch_size=4))
    prediction = trainer.predict(dataset)
    expected = direct_layer_outputs(model, dataset).layer_logits.transpose(0, 1).numpy()
    assert prediction.predictions.shape == (10, NUM_LAYERS, 3)
    np.testing.assert_allclose(prediction.predictions, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(prediction.label_ids, dataset["labels"])


def test_predict_runs_every_layer_even_when_the_model_would_exit_early(tmp_path):
    dataset = toy_dataset(10).remove_columns("labels")
    model = deterministic_model()
    model.exit_config = ExitConfig(rule="fixed", exit_layer=1)  # every sample would leave after layer 1
    prediction = AlignedTrainer(model, training_args(tmp_path)).predict(dataset)
    model.eval()
    with torch.no_grad():
        expected = model(**as_batch(dataset), output_layer_logits=True).layer_logits.transpose(0, 1).numpy()
    assert prediction.label_ids is None
    np.testing.assert_allclose(prediction.predictions, expected, rtol=1e-5, atol=1e-6)


def test_preprocess_logits_for_metrics_sees_layers_and_may_keep_only_class_ids(tmp_path):
    dataset = toy_dataset(10)
    model = deterministic_model(seed=2)
    shapes = []

    def keep_argmax(logits, labels):
        shapes.append(tuple(logits.shape))
        return logits.argmax(dim=-1)

    args = training_args(tmp_path, per_device_eval_batch_size=4)
    trainer = AlignedTrainer(model, args, eval_dataset=dataset, preprocess_logits_for_metrics=keep_argmax)
    metrics = trainer.evaluate()
    assert shapes == [(4, NUM_LAYERS, 3), (4, NUM_LAYERS, 3), (2, NUM_LAYERS, 3)]
    assert_layer_accuracies(metrics, model, dataset)
    assert not any(key.startswith("eval_layer_") and key.endswith("_loss") for key in metrics)


# ---------------------------------------------------------------------------------------------------------------
# Arguments, overrides and baselines
# ---------------------------------------------------------------------------------------------------------------


def test_layer_weights_from_arguments_override_the_config_and_are_saved(tmp_path):
    model = deterministic_model(layer_weights="linear")
    args = training_args(
        tmp_path, layer_weights="last", learning_rate=0.0, max_steps=1, per_device_train_batch_size=24
    )
    args.logging_steps = 1
    trainer = AlignedTrainer(model, args, train_dataset=toy_dataset())
    assert model.config.layer_weights == "last"
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert log["loss"] == pytest.approx(direct_layer_outputs(model, toy_dataset()).layer_losses[-1].item(), rel=1e-5)
    trainer.save_model(str(tmp_path / "saved"))
    assert AutoConfig.from_pretrained(tmp_path / "saved").layer_weights == "last"


def test_aligned_layers_and_weight_lists_override_the_config(tmp_path):
    model = deterministic_model()
    args = training_args(tmp_path, layer_weights=[1.0, 1.0, 1.0, 3.0], aligned_layers=[4, 2])
    AlignedTrainer(model, args)
    assert model.config.aligned_layers == [2, 4]
    assert model.config.resolved_layer_weights == pytest.approx([0.0, 0.25, 0.0, 0.75])


def test_a_bad_override_is_rejected_before_the_model_changes(tmp_path):
    model = deterministic_model(layer_weights="uniform")
    with pytest.raises(ValueError, match="has 2 entries but the model has 4 layers"):
        AlignedTrainer(model, training_args(tmp_path, layer_weights=[1.0, 2.0]))
    with pytest.raises(ValueError, match="aligned_layers"):
        AlignedTrainer(model, training_args(tmp_path, aligned_layers=[5]))
    assert model.config.layer_weights == "uniform"
    assert model.config.aligned_layers is None


def test_plain_training_arguments_are_upgraded(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.123, use_cpu=True, report_to="none")
    trainer = AlignedTrainer(deterministic_model(layer_weights="uniform"), args)
    assert isinstance(trainer.args, AlignedTrainingArguments)
    assert trainer.args.learning_rate == 0.123
    assert trainer.args.output_dir == str(tmp_path)
    assert trainer.args.minimal_depth_tolerance == 0.01
    assert trainer.model.config.layer_weights == "uniform"


def test_model_init_models_get_the_overrides(tmp_path):
    trainer = AlignedTrainer(
        model_init=lambda: deterministic_model(), args=training_args(tmp_path, layer_weights="uniform")
    )
    assert trainer.model.config.layer_weights == "uniform"


def test_non_aligned_models_and_unsupported_arguments_are_rejected(tmp_path):
    plain = BertForSequenceClassification(tiny_base_config("bert"))
    with pytest.raises(TypeError, match=r"AlignedForSequenceClassification.from_pretrained"):
        AlignedTrainer(plain, training_args(tmp_path))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        AlignedTrainer(deterministic_model(), training_args(tmp_path, label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="eval_accumulation_steps"):
        AlignedTrainer(deterministic_model(), training_args(tmp_path, batch_eval_metrics=True))


def test_training_arguments_parse_from_the_command_line(tmp_path):
    parser = HfArgumentParser(AlignedTrainingArguments)
    common = ["--output_dir", str(tmp_path), "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses([*common, "--layer_weights", "0,0,1,1", "--aligned_layers", "3", "4"])
    assert args.layer_weights == [0.0, 0.0, 1.0, 1.0]
    assert args.aligned_layers == [3, 4]
    (args,) = parser.parse_args_into_dataclasses([*common, "--layer_weights", "uniform"])
    assert args.layer_weights == "uniform"
    (args,) = parser.parse_args_into_dataclasses(common)
    assert args.layer_weights is None and args.minimal_depth_tolerance == 0.01
    with pytest.raises(ValueError, match="neither a scheme"):
        parser.parse_args_into_dataclasses([*common, "--layer_weights", "deep"])
    with pytest.raises(ValueError, match="minimal_depth_tolerance"):
        parser.parse_args_into_dataclasses([*common, "--minimal_depth_tolerance", "1.5"])


def test_per_layer_heads_baseline_trains_every_head(tmp_path):
    model = deterministic_model(classifier_sharing="per_layer", layer_weights="uniform")
    initial = {name: value.clone() for name, value in model.classifier.named_parameters()}
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=8)
    trainer = AlignedTrainer(model, args, train_dataset=toy_dataset(), eval_dataset=toy_dataset(8, 1))
    trainer.train()
    for layer in range(NUM_LAYERS):
        name = f"heads.{layer}.out_proj.weight"
        assert not torch.equal(model.classifier.get_parameter(name), initial[name]), name
    metrics = trainer.evaluate()
    assert_layer_accuracies(metrics, model, toy_dataset(8, 1))


def test_lora_wrapped_models_train_and_evaluate_layer_by_layer(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        deterministic_model(layer_weights="last"),
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    )
    frozen = {name: value.clone() for name, value in model.named_parameters() if not value.requires_grad}
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=8, layer_weights="uniform")
    args.logging_steps = 1
    trainer = AlignedTrainer(model, args, train_dataset=toy_dataset(), eval_dataset=toy_dataset(8, 1))
    assert model.config.layer_weights == "uniform"
    trainer.train()
    assert all(f"layer_{NUM_LAYERS}_loss" in log for log in trainer.state.log_history if "loss" in log)
    assert all(torch.equal(value, frozen[name]) for name, value in model.named_parameters() if name in frozen)
    metrics = trainer.evaluate()
    assert_layer_accuracies(metrics, model, toy_dataset(8, 1))


def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    # Dropout stays on: resuming must restore the RNG state and the data order as well as weights and optimizer.
    def run(output_dir, resume=None):
        model = tiny_model("bert", seed=0)
        args = training_args(
            output_dir, max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3
        )
        args.logging_steps = 1
        trainer = AlignedTrainer(model, args, train_dataset=toy_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return model.state_dict(), {log["step"]: log for log in trainer.state.log_history if "loss" in log}

    full_state, full_logs = run(tmp_path / "full")
    resumed_state, resumed_logs = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    for name, value in full_state.items():
        assert torch.equal(resumed_state[name], value), name
    for step in (4, 5, 6):
        assert resumed_logs[step] == full_logs[step]


# ---------------------------------------------------------------------------------------------------------------
# Metric helpers
# ---------------------------------------------------------------------------------------------------------------


def test_minimal_depth():
    assert minimal_depth([0.5, 0.8, 0.9, 0.905], tolerance=0.01) == 3
    assert minimal_depth([0.5, 0.8, 0.9, 0.905], tolerance=0.0) == 4
    assert minimal_depth([0.95, 0.8, 0.9], tolerance=0.01) == 1
    assert minimal_depth([0.7, 0.8], tolerance=0.1) == 1
    with pytest.raises(ValueError, match="empty"):
        minimal_depth([])


def test_layerwise_metrics_for_regression_and_multi_label_models():
    regression = deterministic_model(num_labels=1)
    regression.config.problem_type = "regression"
    predictions = np.random.default_rng(0).normal(size=(6, NUM_LAYERS, 1)).astype(np.float32)
    targets = np.linspace(-1, 1, 6).astype(np.float32)
    metrics = LayerwiseMetrics(regression)(EvalPrediction(predictions, targets))
    assert not any("accuracy" in key for key in metrics) and "minimal_depth" not in metrics
    for layer in range(1, NUM_LAYERS + 1):
        expected = float(np.mean((predictions[:, layer - 1, 0] - targets) ** 2))
        assert metrics[f"layer_{layer}_loss"] == pytest.approx(expected, rel=1e-5)

    multi_label = deterministic_model(problem_type="multi_label_classification")
    logits = np.array([[[2.0, -1.0, 1.0]] * NUM_LAYERS, [[-1.0, -1.0, 1.0]] * NUM_LAYERS], dtype=np.float32)
    logits[0, 0] = [2.0, 1.0, 1.0]  # layer 1 gets the first sample's second label wrong
    labels = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    metrics = LayerwiseMetrics(multi_label)(EvalPrediction(logits, labels))
    assert metrics["layer_1_accuracy"] == 0.5
    assert metrics["layer_2_accuracy"] == metrics["accuracy"] == 1.0
    assert metrics["minimal_depth"] == 2


def test_format_layer_table():
    runs = {
        "standard": {"eval_layer_1_accuracy": 0.5, "eval_layer_2_accuracy": 0.9, "eval_minimal_depth": 2},
        "aligned": {"eval_layer_1_accuracy": 0.875, "eval_layer_2_accuracy": 0.88, "eval_minimal_depth": 1},
    }
    lines = format_layer_table(runs).splitlines()
    assert lines[0].split() == ["layer", "standard", "aligned"]
    assert lines[1].split() == ["1", "0.5000", "0.8750"]
    assert lines[2].split() == ["2", "0.9000", "0.8800"]
    assert lines[3].split() == ["minimal", "depth", "2", "1"]


def test_an_inherited_master_addr_on_one_cpu_process_gets_a_hedged_warning():
    logger = logging.get_logger("hf_aligned.distributed")
    # A single-process CPU job whose scheduler (SLURM, Kubernetes) exported MASTER_ADDR: no WORLD_SIZE either.
    environ = {"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "10.0.0.7"}
    with CaptureLogger(logger) as captured:
        check_launch(1, "NO", environ=environ)
    assert "may have been asked for several processes but started one" in captured.out
    assert "SLURM or Kubernetes may export itself" in captured.out
    with CaptureLogger(logger) as captured:  # a real multi-process launch sets WORLD_SIZE: no warning
        check_launch(1, "NO", environ={**environ, "WORLD_SIZE": "2"})
    assert captured.out == ""
