"""Certified exit calibration (Learn then Test): p-values and choices against scipy, data paths, labels, rules."""

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from scipy import stats

from hf_aligned import (
    AlignedForSequenceClassification,
    CalibrationResult,
    ExitCalibrationArguments,
    ExitConfig,
    build_model_card,
    calibrate_exits,
    calibration_grid,
    evaluate_exits,
)
from hf_aligned.risk_control import (
    binomial_cdf,
    binomial_p_values,
    clopper_pearson_upper,
    fixed_sequence_test,
    minimum_samples,
)
from tests.test_exits import confident_model
from tests.testing_utils import NUM_LAYERS, tiny_inputs

RULES = ("confidence", "margin", "entropy", "agreement", "patience")


def synthetic_logits(num_samples=600, num_layers=NUM_LAYERS, num_labels=3, seed=0):
    """Per-layer logits that grow surer with depth (later layers mostly agree with the last), and noisy labels."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randint(num_labels, (num_samples,), generator=generator)
    layers = []
    for layer in range(1, num_layers + 1):
        noise = torch.randn(num_samples, num_labels, generator=generator) * 1.5
        signal = torch.nn.functional.one_hot(truth, num_labels).float() * (1.2 * layer)
        layers.append(signal + noise)
    labels = truth.clone()
    flip = torch.rand(num_samples, generator=generator) < 0.1
    labels[flip] = (labels[flip] + 1) % num_labels
    return torch.stack(layers), labels


def prepared(layer_logits):
    """Probabilities, sorted probabilities, predictions and agreement with the previous layer, in numpy."""
    probabilities = torch.softmax(layer_logits.double(), dim=-1).numpy()
    predictions = probabilities.argmax(-1)
    same = np.zeros_like(predictions, dtype=bool)
    same[1:] = predictions[1:] == predictions[:-1]
    return probabilities, np.sort(probabilities, axis=-1)[..., ::-1], predictions, same


def hand_exit_layers(layer_logits, rule, value, arrays=None):
    """Exit layers written out with numpy, all samples at once: the first layer where the rule fires, else the last."""
    probabilities, top, predictions, same = arrays or prepared(layer_logits)
    num_layers, _, num_labels = probabilities.shape
    if rule == "patience":
        streak = np.zeros_like(predictions)
        for layer in range(1, num_layers):
            streak[layer] = np.where(same[layer], streak[layer - 1] + 1, 0)
        fires = streak >= value
    elif rule == "entropy":
        entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(-1) / np.log(num_labels)
        fires = entropy <= value
    elif rule == "margin":
        fires = top[..., 0] - top[..., 1] >= value
    else:
        fires = (top[..., 0] >= value) & (same if rule == "agreement" else True)
    fires[-1] = True
    return torch.from_numpy(fires.argmax(0) + 1)


def independent_ltt(layer_logits, labels, rule, epsilon, delta, risk):
    """Learn then Test written out with scipy: per grid setting (in order) the loss count, the binomial p-value,
    stop at the first p > delta; the certified setting with the fewest layers wins."""
    full = layer_logits[-1].argmax(-1)
    samples = torch.arange(layer_logits.shape[1])
    p_values, certified = [], []
    stopped = False
    arrays = prepared(layer_logits)
    for index, value in enumerate(calibration_grid(rule, layer_logits.shape[0])):
        layers = hand_exit_layers(layer_logits, rule, value, arrays)
        exit_predictions = layer_logits[layers - 1, samples].argmax(-1)
        if risk == "consistency":
            losses = int((exit_predictions != full).sum())
        else:
            losses = int(((exit_predictions != labels) & (full == labels)).sum())
        p_value = stats.binom.cdf(losses, layer_logits.shape[1], epsilon)
        p_values.append(p_value)
        if p_value > delta:
            stopped = True
        if not stopped:  # the fastest wins; ties go to the lower risk, then to the setting tested first
            certified.append((layers.float().mean().item(), losses, index, value))
    chosen = min(certified)[-1] if certified else None
    return p_values, chosen


def test_binomial_p_values_and_bounds_match_scipy():
    for n, epsilon in [(230, 0.01), (1000, 0.01), (57, 0.2), (3000, 0.003)]:
        counts = np.arange(0, n + 1, max(1, n // 37))
        np.testing.assert_allclose(
            binomial_p_values(counts, n, epsilon), stats.binom.cdf(counts, n, epsilon), rtol=1e-9, atol=1e-300
        )
    assert binomial_cdf(np.array([0, 5]), 5, 0.0).tolist() == [1.0, 1.0]
    for count, n, delta in [(0, 230, 0.1), (7, 1000, 0.1), (40, 300, 0.05), (299, 300, 0.2)]:
        expected = stats.beta.ppf(1 - delta, count + 1, n - count)
        assert clopper_pearson_upper(count, n, delta) == pytest.approx(expected, abs=2e-9)
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0
    for epsilon, delta in [(0.01, 0.1), (0.05, 0.2), (0.001, 0.05)]:
        needed = minimum_samples(epsilon, delta)
        assert (1 - epsilon) ** needed <= delta < (1 - epsilon) ** (needed - 1)
    assert minimum_samples(0.01, 0.1) == 230
    p_values = np.array([[0.01, 0.05, 0.2, 0.01], [0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert fixed_sequence_test(p_values, 0.1).tolist() == [2, 0, 4]


@pytest.mark.parametrize("risk", ["consistency", "accuracy"])
@pytest.mark.parametrize("rule", RULES)
def test_ltt_chooses_what_an_independent_computation_chooses(rule, risk):
    layer_logits, labels = synthetic_logits(num_samples=160, seed=3)
    result = calibrate_exits(
        layer_logits=layer_logits, labels=labels, max_accuracy_drop=0.05, delta=0.1, risk=risk, rule=rule
    )
    p_values, chosen = independent_ltt(layer_logits, labels, rule, 0.05, 0.1, risk)
    np.testing.assert_allclose([point["p_value"] for point in result.curve], p_values, rtol=1e-9, atol=1e-300)
    assert result.chosen == chosen
    assert chosen is not None and result.expected_speedup > 1.0, "the synthetic data should allow some exits"
    assert result.num_samples == 160
    assert result.empirical_risk <= result.risk_bound <= 0.05
    counts = round(result.empirical_risk * 160)
    assert result.risk_bound == pytest.approx(stats.beta.ppf(0.9, counts + 1, 160 - counts), abs=2e-9)


def labelled_dataset(model, num_samples=64, seed=0):
    """Token inputs with labels: the model's own last-layer prediction, flipped on one row in four."""
    inputs = tiny_inputs("bert", batch_size=num_samples, seed=seed)
    with torch.no_grad():
        labels = model(**inputs, early_exit=False).logits.argmax(-1)
    labels[::4] = (labels[::4] + 1) % 3
    return Dataset.from_dict({**{name: value.tolist() for name, value in inputs.items()}, "labels": labels.tolist()})


@pytest.mark.parametrize("rule", RULES)
def test_dataset_and_stored_logits_give_the_same_setting_and_online_exits_keep_it(rule):
    model = confident_model("bert")
    dataset = labelled_dataset(model)
    options = {"max_accuracy_drop": 0.1, "delta": 0.2, "rule": rule}
    from_data = calibrate_exits(model, dataset, batch_size=16, **options)
    inputs = {name: torch.tensor(dataset[name]) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    from_logits = calibrate_exits(layer_logits=layer_logits, labels=dataset["labels"], **options)

    def outline(result):
        return [
            (point["threshold"], point["risk"], point["mean_exit_layer"], point["p_value"]) for point in result.curve
        ]

    assert outline(from_data) == outline(from_logits)
    assert from_data.chosen == from_logits.chosen and from_data.accuracy == from_logits.accuracy
    assert model.exit_config.to_dict() == from_logits.to_exit_config().to_dict()
    # Served online, the calibrated setting exits where the calibration said, with the risk it measured.
    online = model.early_exit_predict(**inputs)
    assert online.exit_layers.float().mean().item() == pytest.approx(from_data.mean_exit_layer)
    disagreement = (online.predictions != layer_logits[-1].argmax(-1)).float().mean().item()
    assert disagreement == pytest.approx(from_data.empirical_risk)


def test_labels_of_minus_100_are_ignored():
    layer_logits, labels = synthetic_logits(num_samples=500, seed=5)
    partly = labels.clone()
    partly[1::2] = -100
    kept = partly != -100
    result = calibrate_exits(layer_logits=layer_logits, labels=partly, max_accuracy_drop=0.05, risk="accuracy")
    subset = calibrate_exits(
        layer_logits=layer_logits[:, kept], labels=labels[kept], max_accuracy_drop=0.05, risk="accuracy"
    )
    assert result.to_dict() == subset.to_dict()
    assert result.num_samples == 250
    # Consistency needs no labels: every sample counts, and the accuracies are over the labelled ones only.
    consistent = calibrate_exits(layer_logits=layer_logits, labels=partly, max_accuracy_drop=0.05)
    assert consistent.num_samples == 500
    full = layer_logits[-1].argmax(-1)
    assert consistent.full_accuracy == pytest.approx((full[kept] == labels[kept]).float().mean().item())
    # Issue #20, defect 10: 4 right + 4 ignored is full accuracy 1.0, not 0.5.
    four = torch.tensor([[[4.0, 0.0]] * 8] * 2)
    right = torch.tensor([0, 0, 0, 0, -100, -100, -100, -100])
    empirical = calibrate_exits(layer_logits=four, labels=right, method="empirical", risk="accuracy")
    assert empirical.full_accuracy == 1.0 and empirical.num_samples == 4
    assert calibrate_exits(layer_logits=four, labels=right, method="empirical").full_accuracy == 1.0


def test_unlabelled_data_calibrates_consistency_and_refuses_accuracy():
    model = confident_model("bert")
    dataset = labelled_dataset(model).remove_columns("labels")
    result = calibrate_exits(model, dataset, max_accuracy_drop=0.1, delta=0.2)
    assert result.full_accuracy is None and result.accuracy is None
    assert result.num_samples == 64 and result.risk == "consistency"
    with pytest.raises(ValueError, match=r"risk='accuracy' needs labelled data .* use risk='consistency'"):
        calibrate_exits(model, dataset, max_accuracy_drop=0.1, delta=0.2, risk="accuracy")
    everything_ignored = torch.full((64,), -100)
    with pytest.raises(ValueError, match=r"risk='accuracy' needs labelled data"):
        calibrate_exits(
            layer_logits=torch.randn(4, 64, 3),
            labels=everything_ignored,
            risk="accuracy",
            delta=0.5,
            max_accuracy_drop=0.5,
        )


def test_too_little_data_says_how_much_is_needed():
    model = confident_model("bert")
    before = model.exit_config
    with pytest.raises(ValueError, match=r"needs at least 230 samples .*got 64.*method='empirical' \(no guarantee\)"):
        calibrate_exits(model, labelled_dataset(model))
    assert model.exit_config is before
    with pytest.raises(ValueError, match=r"needs at least 45 labelled samples .*got 44"):
        calibrate_exits(
            layer_logits=torch.randn(4, 89, 3), labels=[0] * 44 + [-100] * 45, risk="accuracy", max_accuracy_drop=0.05
        )


def test_nothing_certified_means_never_exit_with_a_warning(caplog):
    layer_logits, labels = synthetic_logits(num_samples=300, seed=1)
    layer_logits[:-1] = torch.roll(layer_logits[-1], 1, dims=-1) * 10  # confident early layers, always wrong
    result = calibrate_exits(layer_logits=layer_logits, labels=labels, max_accuracy_drop=0.01, delta=0.1)
    assert result.chosen is None and result.expected_speedup == 1.0
    assert result.to_exit_config().never_exits
    assert "never exits early" in caplog.text


def test_per_layer_heads_calibrate_like_a_shared_classifier():
    model = confident_model("bert", classifier_sharing="per_layer")
    dataset = labelled_dataset(model)
    result = calibrate_exits(model, dataset, max_accuracy_drop=0.1, delta=0.2, risk="accuracy", batch_size=64)
    inputs = {name: torch.tensor(dataset[name]) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    _, chosen = independent_ltt(layer_logits, torch.tensor(dataset["labels"]), "margin", 0.1, 0.2, "accuracy")
    assert result.chosen == chosen
    online = model.early_exit_predict(**inputs)
    assert online.exit_layers.float().mean().item() == pytest.approx(result.mean_exit_layer)


def test_result_repr_config_and_card_state_the_guarantee(tmp_path):
    model = confident_model("bert")
    layer_logits, labels = synthetic_logits(num_samples=1000, seed=2)
    result = calibrate_exits(model, layer_logits=layer_logits, labels=labels, max_accuracy_drop=0.01, delta=0.1)
    text = repr(result)
    assert "curve" not in text and len(text) < 320, text
    assert f"threshold={result.chosen:g}" in text
    assert (
        "disagrees with full depth on at most 1% of inputs, with 90% confidence, calibrated on 1,000 samples" in text
    )
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "exit_config.json").read_text())
    assert saved["calibration"] == {
        "method": "ltt",
        "risk": "consistency",
        "max_accuracy_drop": 0.01,
        "delta": 0.1,
        "num_samples": 1000,
        "empirical_risk": result.empirical_risk,
        "risk_bound": result.risk_bound,
    }
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.exit_config == model.exit_config
    card = build_model_card(reloaded).text
    assert (
        "disagrees with full depth on at most 1% of inputs, with 90% confidence, calibrated on 1,000 samples" in card
    )
    assert "exchangeable" in card
    # A setting changed by hand no longer carries the guarantee.
    assert reloaded.exit_config.update(threshold=0.5).calibration is None
    assert reloaded.exit_config.update(min_layer=1).calibration == saved["calibration"]
    empirical = calibrate_exits(layer_logits=layer_logits, labels=labels, method="empirical", risk="accuracy")
    assert "no guarantee" in repr(empirical)
    assert isinstance(empirical, CalibrationResult) and empirical.risk_bound is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "fixed"}, r"`rule='fixed'` cannot be calibrated"),
        ({"method": "conformal"}, r"`method='conformal'` is not a calibration method"),
        ({"risk": "loss"}, r"`risk='loss'` is not a risk"),
        ({"delta": 1.0}, r"`delta=1.0` is a probability strictly between 0 and 1"),
        ({"max_accuracy_drop": 0.0}, r"must lie strictly between 0 and 1 for method='ltt'"),
        ({"labels": [0, 1]}, r"`labels` has 2 entries but `layer_logits` 300 samples .* transpose"),
        ({"thresholds": []}, r"`thresholds` is empty"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_exits(layer_logits=torch.randn(4, 300, 3), **kwargs)


def test_bad_inputs_are_named():
    model = confident_model("bert")
    with pytest.raises(ValueError, match=r"either `dataset` .* or `layer_logits`"):
        calibrate_exits(model)
    with pytest.raises(ValueError, match=r"`layer_logits` must be floating-point logits shaped"):
        calibrate_exits(layer_logits=torch.randn(300, 3))
    with pytest.raises(ValueError, match=r"`layer_logits` has 3 layers, the model 4"):
        calibrate_exits(model, layer_logits=torch.randn(3, 300, 3))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'epsilon'"):
        calibrate_exits(model, layer_logits=torch.randn(4, 300, 3), epsilon=0.1)


def test_evaluate_exits_scores_a_setting_as_computed_by_hand():
    model = confident_model("bert")
    dataset = labelled_dataset(model, num_samples=40, seed=7)
    labels = torch.tensor(dataset["labels"])
    labels[:5] = -100
    dataset = dataset.remove_columns("labels").add_column("labels", labels.tolist())
    config = ExitConfig(threshold=0.8)
    evaluation = evaluate_exits(model, dataset, config, batch_size=16, repeats=1)
    inputs = {name: torch.tensor(dataset[name]) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    layers = hand_exit_layers(layer_logits, "confidence", 0.8)
    predictions = layer_logits[layers - 1, torch.arange(40)].argmax(-1)
    full = layer_logits[-1].argmax(-1)
    kept = labels != -100
    assert evaluation.num_samples == 40
    assert evaluation.full_accuracy == pytest.approx((full[kept] == labels[kept]).float().mean().item())
    assert evaluation.accuracy == pytest.approx((predictions[kept] == labels[kept]).float().mean().item())
    assert evaluation.accuracy_drop == pytest.approx(evaluation.full_accuracy - evaluation.accuracy)
    assert evaluation.disagreement == pytest.approx((predictions != full).float().mean().item())
    assert evaluation.exit_histogram == torch.bincount(layers - 1, minlength=NUM_LAYERS).tolist()
    assert evaluation.ideal_speedup == pytest.approx(NUM_LAYERS / layers.float().mean().item())
    assert evaluation.measured_speedup > 0 and math.isfinite(evaluation.measured_speedup)
    assert evaluate_exits(model, dataset, config, measure_speed=False).measured_speedup is None


def test_minus_100_labels_in_a_dataset_are_ignored_and_small_splits_fail_before_training():
    model = confident_model("bert")
    dataset = labelled_dataset(model, num_samples=8)
    inputs = {name: torch.tensor(dataset[name]) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = model(**inputs, early_exit=False).logits.argmax(-1)
    labels = full.tolist()[:4] + [-100] * 4  # 4 right + 4 ignored (issue #20, defect 10)
    dataset = dataset.remove_columns("labels").add_column("labels", labels)
    result = calibrate_exits(model, dataset, method="empirical", risk="accuracy")
    assert result.full_accuracy == 1.0 and result.num_samples == 4
    ExitCalibrationArguments().check_size(230)
    ExitCalibrationArguments(calibration_method="empirical").check_size(5)
    with pytest.raises(ValueError, match=r"has 229 samples; a guarantee .* needs at least 230"):
        ExitCalibrationArguments().check_size(229)
