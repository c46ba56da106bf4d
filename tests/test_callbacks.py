"""`RepresentationDynamicsCallback` inside a plain `transformers.Trainer`."""

from __future__ import annotations

import copy
import json

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from hf_aligned import RepresentationDynamicsCallback, classifier_layer_accuracy, layer_representations, plot_dynamics

from .testing_utils import tiny_model


def token_dataset(num_samples: int, seed: int, with_labels: bool = True) -> datasets.Dataset:
    """Equal-length random token sequences; the label is the first token's residue mod 3."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 99, (num_samples, 6), generator=generator)
    columns = {"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist()}
    if with_labels:
        columns["label"] = (input_ids[:, 0] % 3).tolist()
    return datasets.Dataset.from_dict(columns)


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-3,
        "max_steps": 4,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": "none",
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


@pytest.mark.slow
def test_dynamics_recorded_through_a_trainer(tmp_path):
    model = tiny_model("bert", layer_weights="uniform")
    initial_model = copy.deepcopy(model)
    probe_set = token_dataset(40, seed=2)
    callback = RepresentationDynamicsCallback(probe_set, batch_size=16, linear_probes=True)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=token_dataset(32, seed=0),
        eval_dataset=token_dataset(16, seed=1),
        callbacks=[callback],
    )
    trainer.train()

    written = json.loads((tmp_path / "representation_dynamics.json").read_text())
    assert (tmp_path / "representation_dynamics.png").stat().st_size > 0
    assert written["num_samples"] == 40 and written["num_layers"] == 4
    records = written["records"]
    assert [record["step"] for record in records] == [0, 2, 4]
    assert records[0]["cka_to_initial"] == pytest.approx([1.0] * 5)
    assert records[0]["cka_to_previous"] is None
    assert all(len(record["probe_accuracy"]) == 5 for record in records)

    initial = layer_representations(initial_model, probe_set).numpy()
    final = layer_representations(model, probe_set).numpy()
    middle_to_final = records[2]["cka_to_previous"]
    assert records[2]["cka_to_initial"] == pytest.approx([numpy_cka(a, b) for a, b in zip(initial, final)], abs=1e-6)
    assert min(records[2]["cka_to_initial"][1:]) < 0.999  # training moved the representations
    assert all(0.0 <= value <= 1.0 + 1e-9 for value in middle_to_final)
    assert records[2]["classifier_accuracy"] == pytest.approx(classifier_layer_accuracy(model, probe_set), abs=1e-12)
    assert records[0]["classifier_accuracy"] == pytest.approx(
        classifier_layer_accuracy(initial_model, probe_set), abs=1e-12
    )


def _call(callback, event, output_dir, step, model, main_process=True):
    state = TrainerState()
    state.global_step = step
    state.epoch = step / 10
    state.is_world_process_zero = main_process
    args = training_args(output_dir)
    return getattr(callback, event)(args, state, TrainerControl(), model=model, metrics={})


def test_only_the_main_process_writes(tmp_path):
    model = tiny_model("bert")
    callback = RepresentationDynamicsCallback(token_dataset(12, seed=0))
    for event, step in (("on_train_begin", 0), ("on_evaluate", 5), ("on_train_end", 5)):
        _call(callback, event, tmp_path, step, model, main_process=False)
    assert len(callback.records) == 2
    assert list(tmp_path.iterdir()) == []


def test_one_record_per_step_and_probe_sets_without_labels(tmp_path):
    model = tiny_model("bert").train()
    callback = RepresentationDynamicsCallback(
        token_dataset(12, seed=0, with_labels=False), file_name="dyn", plot=False
    )
    _call(callback, "on_evaluate", tmp_path, 4, model)  # evaluate() before any training: becomes the reference
    _call(callback, "on_evaluate", tmp_path, 4, model)  # a second evaluation set at the same step
    _call(callback, "on_train_end", tmp_path, 4, model)
    assert model.training
    written = json.loads((tmp_path / "dyn.json").read_text())
    assert len(written["records"]) == 1
    assert written["records"][0]["classifier_accuracy"] is None
    assert not (tmp_path / "dyn.png").exists()


def test_nan_cka_is_written_as_null(tmp_path):
    # With the CLS token first in every sample, BERT's embedding output of that token is constant: CKA is 0 / 0.
    dataset = token_dataset(12, seed=0).map(lambda sample: {"input_ids": [2, *sample["input_ids"][1:]]})
    callback = RepresentationDynamicsCallback(dataset, plot=False)
    _call(callback, "on_train_begin", tmp_path, 0, tiny_model("bert"))
    record = json.loads((tmp_path / "representation_dynamics.json").read_text())["records"][0]
    assert record["cka_to_initial"][0] is None
    assert record["cka_to_initial"][1:] == pytest.approx([1.0] * 4)


def test_plot_dynamics(tmp_path):
    records = [
        {"step": 0, "cka_to_initial": [1.0, 1.0, 1.0], "cka_to_previous": None, "classifier_accuracy": [0.3, 0.4]},
        {
            "step": 5,
            "cka_to_initial": [1.0, 0.8, 0.6],
            "cka_to_previous": [1.0, 0.8, 0.6],
            "classifier_accuracy": None,
        },
    ]
    figure = plot_dynamics(records, tmp_path / "dynamics.png")
    assert len([axis for axis in figure.axes if axis.get_images()]) == 3
    assert (tmp_path / "dynamics.png").stat().st_size > 0
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_dynamics([])


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="`probe_test_size` must lie strictly between 0 and 1"):
        RepresentationDynamicsCallback([], probe_test_size=0.0)
