"""Per-layer linear probes and the shared classifier's per-layer accuracy."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from hf_aligned import ProbeResults, classifier_layer_accuracy, linear_probe_accuracy

from .testing_utils import tiny_inputs, tiny_model


def probe_data(num_samples: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three layers: pure noise, a noisy linear view of the label, and a cleanly separable one."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num_samples)
    signal = (2.0 * labels - 1.0)[:, None] * np.ones((1, 6))
    noise = rng.normal(size=(num_samples, 6))
    weak = 0.4 * signal + rng.normal(size=(num_samples, 6))
    clean = signal + 0.1 * rng.normal(size=(num_samples, 6))
    return np.stack([noise, weak, clean]), labels


def test_linear_probe_accuracy_follows_the_information_in_each_layer():
    reps, labels = probe_data()
    results = linear_probe_accuracy(torch.tensor(reps, dtype=torch.float32), torch.tensor(labels))
    assert isinstance(results, ProbeResults)
    assert (results.num_train, results.num_test) == (150, 50)
    noise, weak, clean = results.test_accuracy
    assert clean == 1.0
    assert 0.7 < weak < 1.0
    assert noise < 0.7
    assert results.to_dict()["test_accuracy"] == results.test_accuracy


def test_linear_probe_accuracy_matches_an_explicit_fit():
    reps, labels = probe_data(seed=1)
    results = linear_probe_accuracy(reps, labels, test_size=0.3, seed=4, regularization=0.5)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=4, stratify=labels)
    for layer, features in enumerate(reps):
        scaler = StandardScaler().fit(features[train])
        probe = LogisticRegression(C=0.5, max_iter=1000, random_state=4).fit(
            scaler.transform(features[train]), labels[train]
        )
        predictions = probe.predict(scaler.transform(features[test]))
        assert results.test_accuracy[layer] == pytest.approx(float(np.mean(predictions == labels[test])), abs=1e-12)
        fitted = probe.predict(scaler.transform(features[train]))
        assert results.train_accuracy[layer] == pytest.approx(float(np.mean(fitted == labels[train])), abs=1e-12)


def test_linear_probe_errors(monkeypatch):
    reps, labels = probe_data()
    with pytest.raises(ValueError, match="one class per sample"):
        linear_probe_accuracy(reps, labels[:10])
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(reps, np.zeros(200, dtype=int))
    with pytest.raises(ValueError, match="`test_size` must lie strictly between 0 and 1"):
        linear_probe_accuracy(reps, labels, test_size=1.0)
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match=r"hf-aligned\[probes\]"):
        linear_probe_accuracy(reps, labels)


def test_classifier_layer_accuracy_matches_layer_logits():
    model = tiny_model("bert", num_labels=3)
    batches = []
    for seed in range(3):
        inputs = tiny_inputs("bert", batch_size=5, seed=seed)
        inputs["labels"] = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(seed))
        batches.append(inputs)
    batches[1]["labels"][2] = -100  # ignored
    accuracy = classifier_layer_accuracy(model, batches)
    correct, counted = np.zeros(model.num_layers), 0
    for batch in batches:
        with torch.no_grad():
            logits = model(
                **{k: v for k, v in batch.items() if k != "labels"}, output_layer_logits=True
            ).layer_logits.numpy()
        labels = batch["labels"].numpy()
        kept = labels != -100
        correct += (logits.argmax(-1)[:, kept] == labels[kept]).sum(axis=1)
        counted += kept.sum()
    assert accuracy == pytest.approx((correct / counted).tolist(), abs=1e-12)
    assert len(accuracy) == model.num_layers


def test_classifier_layer_accuracy_needs_labels():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="needs labels"):
        classifier_layer_accuracy(model, [tiny_inputs("bert")])
