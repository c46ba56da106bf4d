"""Saturation layers and probability vs similarity: hand computations, the trainer metric, the callback and the CLI."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import BertTokenizerFast, DataCollatorWithPadding, EvalPrediction, Trainer

from hf_aligned import (
    AlignedForSequenceClassification,
    AlignedTrainer,
    LayerwiseMetrics,
    RepresentationDynamicsCallback,
    collect_layer_logits,
    layer_representations,
    plot_probability_similarity,
    plot_saturation,
    probability_similarity,
    saturation_layers,
    summarize_saturation,
)
from hf_aligned.cli import main
from hf_aligned.saturation import spearman

from .test_callbacks import token_dataset
from .test_callbacks import training_args as plain_training_args
from .test_cli import text_model_dir, write_texts  # noqa: F401 (a fixture)
from .test_trainer import deterministic_model, direct_layer_outputs, toy_dataset, training_args
from .testing_utils import tiny_model

# ----------------------------------------------------------------------------------------------------------------------
# Independent references, written as the definitions read
# ----------------------------------------------------------------------------------------------------------------------


def top1(scores: list[float]) -> int:
    """The top class, ties to the lowest index."""
    best = max(scores)
    return min(index for index, score in enumerate(scores) if score == best)


def hand_saturation(layer_logits: np.ndarray) -> list[int]:
    """For each sample, the first 1-based layer from which the top-1 prediction equals the last layer's up to L."""
    num_layers, num_samples, _ = layer_logits.shape
    result = []
    for sample in range(num_samples):
        predictions = [top1(list(layer_logits[layer, sample])) for layer in range(num_layers)]
        result.append(
            next(
                layer + 1
                for layer in range(num_layers)
                if all(prediction == predictions[-1] for prediction in predictions[layer:])
            )
        )
    return result


def hand_probability_similarity(reps: np.ndarray, layer_logits: np.ndarray, labels: np.ndarray):
    num_layers, num_samples, _ = layer_logits.shape
    cosine = np.zeros((num_layers, num_samples))
    last = np.zeros((num_layers, num_samples))
    true = np.zeros((num_layers, num_samples))
    for layer in range(num_layers):
        for sample in range(num_samples):
            a, b = reps[layer + 1, sample], reps[num_layers, sample]
            cosine[layer, sample] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            exp = np.exp(layer_logits[layer, sample] - layer_logits[layer, sample].max())
            probabilities = exp / exp.sum()
            last[layer, sample] = probabilities[np.argmax(layer_logits[-1, sample])]
            true[layer, sample] = probabilities[labels[sample]]
    return cosine, last, true


# ----------------------------------------------------------------------------------------------------------------------
# saturation_layers and its summary
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_saturation_layers_equal_a_hand_computation_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Scores drawn from {0, 1, 2}: many samples have tied top classes at some layer.
    layer_logits = rng.integers(0, 3, size=(6, 40, 3)).astype(np.float32)
    expected = hand_saturation(layer_logits)
    assert saturation_layers(layer_logits).tolist() == expected
    assert saturation_layers(torch.from_numpy(layer_logits)).tolist() == expected
    # The same from integer class ids.
    class_ids = np.array([[top1(list(sample)) for sample in layer] for layer in layer_logits])
    assert saturation_layers(class_ids).tolist() == expected
    assert len(set(expected)) > 2  # the draw exercises several saturation layers


def test_saturation_layers_special_cases():
    logits = torch.tensor(
        [
            # sample 0: always class 1; 1: changes at the last layer (never saturates earlier);
            # 2: tie at layer 1 goes to class 0, then class 0; 3: A, B, A, A
            [[0.0, 1.0], [0.0, 1.0], [2.0, 2.0], [3.0, 0.0]],
            [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]],
            [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]],
            [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [3.0, 0.0]],
        ]
    )
    assert saturation_layers(logits).tolist() == [1, 4, 1, 3]
    # One layer: every sample saturates at layer 1.
    assert saturation_layers(logits[:1]).tolist() == [1, 1, 1, 1]
    summary = summarize_saturation(saturation_layers(logits), num_layers=4)
    assert summary.histogram == [2, 0, 1, 1]
    assert summary.saturated_by == [0.5, 0.5, 0.75, 1.0]
    assert summary.mean == pytest.approx(9 / 4)
    assert summary.num_samples == 4 and summary.num_layers == 4


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_exits_relate_to_saturation_as_documented(patience):
    """A patience-p exit leaves by min(s + p, L) and gives the full-depth answer when it leaves at or after s."""
    from hf_aligned import ExitConfig, simulate_exits

    rng = np.random.default_rng(patience)
    layer_logits = torch.from_numpy(rng.integers(0, 3, size=(8, 200, 3)).astype(np.float32))
    saturation = saturation_layers(layer_logits)
    logits, exits = simulate_exits(layer_logits, ExitConfig(rule="patience", patience=patience))
    assert (exits <= (saturation + patience).clamp(max=8)).all()
    late = exits >= saturation
    assert torch.equal(logits[late].argmax(-1), layer_logits[-1, late].argmax(-1))
    assert (~late).any() and late.any()


def test_saturation_errors():
    with pytest.raises(ValueError, match="one score per class"):
        saturation_layers(torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match=r"\[num_layers, num_samples, num_labels\]"):
        saturation_layers(torch.zeros(5, 3))  # float scores without a class dimension
    with pytest.raises(ValueError, match="no layers or no samples"):
        saturation_layers(torch.zeros(0, 4, 3))
    with pytest.raises(ValueError, match=r"1\.\.3"):
        summarize_saturation(torch.tensor([1, 4]), num_layers=3)
    with pytest.raises(ValueError, match="no samples"):
        summarize_saturation(torch.tensor([], dtype=torch.long), num_layers=3)


# ----------------------------------------------------------------------------------------------------------------------
# Probability vs similarity
# ----------------------------------------------------------------------------------------------------------------------


def test_probability_similarity_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(5, 30, 8))
    layer_logits = rng.normal(size=(4, 30, 3)) * 2
    labels = rng.integers(0, 3, size=30)
    result = probability_similarity(reps, layer_logits, labels)
    cosine, last, true = hand_probability_similarity(reps, layer_logits, labels)
    np.testing.assert_allclose(result.cosine.numpy(), cosine, atol=1e-12)
    np.testing.assert_allclose(result.last_class_probability.numpy(), last, atol=1e-12)
    np.testing.assert_allclose(result.true_class_probability.numpy(), true, atol=1e-12)

    summary = result.summary()
    assert summary["mean_cosine"] == pytest.approx(cosine.mean(axis=1).tolist())
    assert summary["mean_true_class_probability"] == pytest.approx(true.mean(axis=1).tolist())
    pooled = stats.spearmanr(cosine[:-1].ravel(), last[:-1].ravel()).statistic
    assert summary["last_class"]["spearman"] == pytest.approx(pooled)
    within = [stats.spearmanr(x, y).statistic for x, y in zip(cosine[:-1], true[:-1])]
    assert summary["true_class"]["spearman_within_layer"] == pytest.approx(within)
    means = stats.spearmanr(cosine.mean(axis=1), last.mean(axis=1)).statistic
    assert summary["last_class"]["spearman_of_layer_means"] == pytest.approx(means)


def test_probability_similarity_ignores_unlabelled_samples_and_checks_shapes():
    rng = np.random.default_rng(1)
    reps, layer_logits = rng.normal(size=(4, 10, 6)), rng.normal(size=(3, 10, 2))
    labels = np.array([0, 1] * 5)
    labels[3] = -100
    result = probability_similarity(reps, layer_logits, labels)
    assert torch.isnan(result.true_class_probability[:, 3]).all()
    kept = np.arange(10) != 3
    _, _, true = hand_probability_similarity(reps[:, kept], layer_logits[:, kept], labels[kept])
    assert result.summary()["mean_true_class_probability"] == pytest.approx(true.mean(axis=1).tolist())
    assert probability_similarity(reps, layer_logits).true_class_probability is None
    with pytest.raises(ValueError, match="embedding output"):
        probability_similarity(reps[1:], layer_logits)
    with pytest.raises(ValueError, match="one class per sample"):
        probability_similarity(reps, layer_logits, labels[:4])
    with pytest.raises(ValueError, match="class ids"):
        probability_similarity(reps, layer_logits, np.full(10, 2))


def test_spearman_ties_and_nan_match_scipy():
    x = np.array([1.0, 2.0, 2.0, 3.0, np.nan, 5.0, 5.0])
    y = np.array([3.0, 1.0, 1.0, 4.0, 2.0, 7.0, 6.0])
    kept = ~np.isnan(x)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x[kept], y[kept]).statistic)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_plots_draw(tmp_path):
    rng = np.random.default_rng(0)
    pairs = probability_similarity(rng.normal(size=(4, 12, 5)), rng.normal(size=(3, 12, 3)), rng.integers(0, 3, 12))
    summary = summarize_saturation(torch.tensor([1, 2, 3, 3]), 3)
    plot_saturation({"a": summary, "b": summary.to_dict()}, tmp_path / "saturation.png")
    plot_probability_similarity({"a": pairs}, tmp_path / "pairs.png", which="true_class")
    assert (tmp_path / "saturation.png").stat().st_size > 0 and (tmp_path / "pairs.png").stat().st_size > 0
    with pytest.raises(ValueError, match="which"):
        plot_probability_similarity({"a": pairs}, which="top")


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's evaluation, the dynamics callback and `hf-aligned analyze`
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluate_reports_the_mean_saturation_layer(tmp_path):
    dataset = toy_dataset(25, seed=3)
    model = deterministic_model(seed=1)
    trainer = AlignedTrainer(model, training_args(tmp_path, per_device_eval_batch_size=7), eval_dataset=dataset)
    metrics = trainer.evaluate()
    layer_logits = direct_layer_outputs(model, dataset).layer_logits.numpy()
    expected = np.mean(hand_saturation(layer_logits))
    assert metrics["eval_mean_saturation_layer"] == pytest.approx(expected)
    assert "eval_minimal_depth" in metrics

    # From class ids, as when `preprocess_logits_for_metrics` keeps the argmax.
    class_ids = layer_logits.argmax(-1).T
    from_ids = LayerwiseMetrics(model)(EvalPrediction(class_ids, np.array(dataset["labels"])))
    assert from_ids["mean_saturation_layer"] == pytest.approx(expected)


def test_no_saturation_metric_for_regression_or_multi_label():
    regression = deterministic_model(num_labels=1)
    regression.config.problem_type = "regression"
    predictions = np.random.default_rng(0).normal(size=(6, 4, 1)).astype(np.float32)
    assert "mean_saturation_layer" not in LayerwiseMetrics(regression)(EvalPrediction(predictions, np.zeros(6)))
    multi_label = deterministic_model(problem_type="multi_label_classification")
    logits = np.random.default_rng(0).normal(size=(6, 4, 3)).astype(np.float32)
    labels = (logits[:, -1] > 0).astype(np.float32)
    assert "mean_saturation_layer" not in LayerwiseMetrics(multi_label)(EvalPrediction(logits, labels))


def test_dynamics_callback_tracks_saturation(tmp_path):
    model = tiny_model("bert", layer_weights="uniform")
    probe_set = token_dataset(20, seed=2)
    callback = RepresentationDynamicsCallback(probe_set, batch_size=8, track_saturation=True, plot=False)
    Trainer(
        model=model,
        args=plain_training_args(tmp_path, max_steps=2),
        train_dataset=token_dataset(16, seed=0),
        eval_dataset=token_dataset(8, seed=1),
        callbacks=[callback],
    ).train()
    records = json.loads((tmp_path / "representation_dynamics.json").read_text())["records"]
    assert [record["step"] for record in records] == [0, 2]
    layer_logits, _ = collect_layer_logits(model, probe_set)
    final = hand_saturation(layer_logits.numpy())
    assert records[-1]["mean_saturation_layer"] == pytest.approx(np.mean(final))
    assert records[-1]["saturated_by"] == pytest.approx([np.mean(np.array(final) <= layer) for layer in range(1, 5)])


def test_analyze_writes_saturation(text_model_dir, tmp_path, capsys):  # noqa: F811 (the fixture)
    data = tmp_path / "data.tsv"
    rows = write_texts(data)
    output = tmp_path / "analysis"
    main(["analyze", str(text_model_dir), "--dataset", str(data), "--output", str(output), "--batch-size", "5"])
    written = json.loads((output / "saturation.json").read_text())
    assert (output / "saturation.png").stat().st_size > 0
    assert (output / "probability_similarity.png").stat().st_size > 0
    assert "Mean saturation layer" in capsys.readouterr().out

    model = AlignedForSequenceClassification.from_pretrained(text_model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(text_model_dir)
    dataset = datasets.Dataset.from_list([dict(tokenizer(row["sentence"])) | {"labels": row["label"]} for row in rows])
    collator = DataCollatorWithPadding(tokenizer)
    # The CLI's batching (5), so that padding and float rounding are the same and the ranks agree.
    reps = layer_representations(model, dataset, batch_size=5, collate_fn=collator).double().numpy()
    layer_logits, labels = collect_layer_logits(model, dataset, batch_size=5, collate_fn=collator)
    saturation = hand_saturation(layer_logits.numpy())
    assert written["saturation"]["mean"] == pytest.approx(np.mean(saturation))
    assert written["saturation"]["histogram"] == np.bincount(np.array(saturation) - 1, minlength=4).tolist()
    cosine, _, true = hand_probability_similarity(reps, layer_logits.double().numpy(), labels.numpy())
    similarity = written["probability_similarity"]
    assert similarity["mean_cosine"] == pytest.approx(cosine.mean(axis=1).tolist(), abs=1e-5)
    expected = stats.spearmanr(cosine[:-1].ravel(), true[:-1].ravel()).statistic
    assert similarity["true_class"]["spearman"] == pytest.approx(expected, abs=1e-9)
    correct = layer_logits[-1].argmax(-1).numpy() == labels.numpy()
    assert written["saturation_by_correctness"]["correct"] == pytest.approx(np.mean(np.array(saturation)[correct]))
