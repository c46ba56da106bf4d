"""Early exit: invariants against the full forward, batching, skipped compute, calibration, truncation (pipelines: test_serving.py)."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hf_aligned import AlignedForSequenceClassification, ExitConfig, calibrate_exits, plot_calibration, simulate_exits
from hf_aligned.exits import exit_scores
from tests.testing_utils import DECODER_FAMILIES, FAMILIES, NUM_LAYERS, tiny_inputs, tiny_model

EXIT_FAMILIES = ("bert", "distilbert", "gpt2", "llama", "vit")


def confident_model(family, seed=0, **kwargs):
    """A tiny model whose classifier is scaled up, so confidences spread over (1/3, 1) and exits happen."""
    model = tiny_model(family, seed=seed, **kwargs)
    with torch.no_grad():
        for head in model.classifier.heads:
            head.out_proj.weight.mul_(40.0)
            if head.pooler is not None:  # a tanh pooler squeezes small random features towards 0
                head.pooler.dense.weight.mul_(10.0)
    return model


def padding_for(family):
    return "left" if family in DECODER_FAMILIES else "right"


def reference_exits(layer_logits, rule, threshold=None, patience=None):
    """Exit layers computed by hand, sample by sample, from every layer's logits."""
    exits = []
    for sample in range(layer_logits.shape[1]):
        streak, previous, chosen = 0, None, NUM_LAYERS
        for layer in range(1, NUM_LAYERS + 1):
            probabilities = layer_logits[layer - 1, sample].softmax(-1)
            prediction = probabilities.argmax().item()
            streak = streak + 1 if prediction == previous else 0
            agrees = prediction == previous
            previous = prediction
            if rule == "patience":
                fires = streak >= patience
            elif rule == "entropy":
                fires = -(probabilities * probabilities.log()).sum() / np.log(probabilities.numel()) <= threshold
            elif rule == "margin":
                top = probabilities.topk(2).values
                fires = top[0] - top[1] >= threshold
            else:
                fires = probabilities.max() >= threshold and (rule == "confidence" or agrees)
            if fires:
                chosen = layer
                break
        exits.append(chosen)
    return exits


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_that_never_fires_equals_the_full_forward(family):
    model = tiny_model(family)
    inputs = tiny_inputs(family, batch_size=5, padding_side=padding_for(family))
    output = model.early_exit_predict(**inputs)
    with torch.no_grad():
        full = model(**inputs, output_layer_logits=True)
    torch.testing.assert_close(output.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert output.exit_layers.tolist() == [NUM_LAYERS] * 5
    assert output.layers_computed == 5 * NUM_LAYERS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", range(1, NUM_LAYERS + 1))
def test_fixed_rule_equals_that_layers_logits(family, layer):
    model = tiny_model(family)
    inputs = tiny_inputs(family, batch_size=4, padding_side=padding_for(family))
    output = model.early_exit_predict(**inputs, rule="fixed", exit_layer=layer)
    with torch.no_grad():
        expected = model(**inputs, output_layer_logits=True).layer_logits[layer - 1]
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=1e-5)
    assert output.exit_layers.tolist() == [layer] * 4
    assert output.layers_computed == 4 * layer


@pytest.mark.parametrize("family", EXIT_FAMILIES)
@pytest.mark.parametrize(
    ("rule", "setting"),
    [
        ("confidence", {"threshold": 0.9}),
        ("margin", {"threshold": 0.8}),
        ("entropy", {"threshold": 0.3}),
        ("agreement", {"threshold": 0.8}),
        ("patience", {"patience": 1}),
    ],
)
def test_exit_layers_follow_the_rule_computed_by_hand(family, rule, setting):
    model = confident_model(family)
    inputs = tiny_inputs(family, batch_size=6, padding_side=padding_for(family), seed=4)
    output = model.early_exit_predict(**inputs, rule=rule, **setting)
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    expected = reference_exits(layer_logits, rule, **setting)
    assert output.exit_layers.tolist() == expected
    for sample, layer in enumerate(expected):
        torch.testing.assert_close(output.logits[sample], layer_logits[layer - 1, sample], atol=1e-5, rtol=1e-5)
    assert output.layers_computed == sum(expected)


@pytest.mark.parametrize("family", EXIT_FAMILIES)
def test_blocks_only_run_on_samples_still_running(family):
    model = confident_model(family)
    inputs = tiny_inputs(family, batch_size=6, padding_side=padding_for(family), seed=4)
    seen = []
    handles = [
        block.register_forward_pre_hook(lambda module, args, layer=layer: seen.append((layer, args[0].shape[0])))
        for layer, block in enumerate(model.blocks, start=1)
    ]
    try:
        output = model.early_exit_predict(**inputs, threshold=0.9)
    finally:
        for handle in handles:
            handle.remove()
    exits = output.exit_layers.tolist()
    expected = [(layer, sum(exit >= layer for exit in exits)) for layer in range(1, max(exits) + 1)]
    assert min(exits) < NUM_LAYERS, "the test needs some sample to leave early"
    assert seen == expected
    assert output.layers_computed == sum(size for _, size in seen)
    assert output.ideal_speedup == pytest.approx(NUM_LAYERS / np.mean(exits))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family_padding=st.sampled_from(
        [("bert", "right"), ("distilbert", "right"), ("gpt2", "left"), ("gpt2", "right"), ("llama", "left")]
    ),
    threshold=st.floats(min_value=0.4, max_value=0.99),
    batch_size=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_a_batch_exits_like_each_sample_alone(family_padding, threshold, batch_size, seed):
    family, padding_side = family_padding
    model = MODELS[family]
    inputs = tiny_inputs(family, batch_size=batch_size, padding_side=padding_side, seed=seed)
    with torch.no_grad():
        scores = exit_scores(model(**inputs, output_layer_logits=True).layer_logits, "confidence")
    assume(bool(((scores - threshold).abs() > 1e-4).all()))  # float noise must not decide a sample's fate
    batched = model.early_exit_predict(**inputs, threshold=threshold)
    for row in range(batch_size):
        keep = inputs["attention_mask"][row].bool()
        alone = model.early_exit_predict(input_ids=inputs["input_ids"][row, keep][None], threshold=threshold)
        assert alone.exit_layers.item() == batched.exit_layers[row].item()
        assert alone.predictions.item() == batched.predictions[row].item()
        torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-5, rtol=1e-5)


MODELS = {family: confident_model(family) for family in ("bert", "distilbert", "gpt2", "llama")}


def test_min_and_max_layer_bound_the_exits():
    model = confident_model("bert")
    inputs = tiny_inputs("bert", batch_size=6, seed=4)
    output = model.early_exit_predict(**inputs, threshold=0.34, min_layer=2, max_layer=3)
    assert set(output.exit_layers.tolist()) <= {2, 3}
    assert model.early_exit_predict(**inputs, threshold=0.34, min_layer=2).exit_layers.min() == 2


def test_per_layer_heads_baseline_exits_with_its_own_heads():
    model = confident_model("bert", classifier_sharing="per_layer")
    inputs = tiny_inputs("bert", batch_size=6, seed=4)
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    for layer in range(1, NUM_LAYERS + 1):
        fixed = model.early_exit_predict(**inputs, rule="fixed", exit_layer=layer)
        torch.testing.assert_close(fixed.logits, layer_logits[layer - 1], atol=1e-5, rtol=1e-5)
    output = model.early_exit_predict(**inputs, threshold=0.9)
    assert output.exit_layers.tolist() == reference_exits(layer_logits, "confidence", threshold=0.9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "margins"}, r"`rule='margins'` is not an exit rule"),
        ({"rule": "margin", "threshold": 1.5}, r"`threshold=1.5` must lie in \[0, 1\] for rule 'margin'"),
        ({"threshold": 1.5}, r"`threshold=1.5` must lie in \(0, 1\] for rule 'confidence'"),
        ({"rule": "entropy", "threshold": -0.1}, r"`threshold=-0.1` must lie in \[0, 1\] for rule 'entropy'"),
        ({"rule": "patience", "patience": 0}, r"`patience=0` must be a positive integer"),
        ({"rule": "fixed"}, r"rule 'fixed' needs `exit_layer`"),
        ({"exit_layer": 2}, r"`exit_layer` is only used by rule 'fixed'"),
        ({"min_layer": 3, "max_layer": 2}, r"`max_layer=2` is below `min_layer=3`"),
        ({"min_layer": 0}, r"`min_layer=0` must be a 1-based layer index"),
    ],
)
def test_invalid_exit_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitConfig(**kwargs)


def test_exit_config_checked_against_the_model_and_unknown_overrides_rejected():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with pytest.raises(ValueError, match=r"`exit_layer=9` is deeper than the model, which has 4 layers"):
        model.early_exit_predict(**inputs, rule="fixed", exit_layer=9)
    with pytest.raises(TypeError, match=r"\['treshold'\] are not ExitConfig fields"):
        model.exit_config.update(treshold=0.9)


def test_regression_models_only_exit_at_a_fixed_layer():
    model = tiny_model("bert", num_labels=1, problem_type="regression")
    inputs = tiny_inputs("bert")
    with pytest.raises(ValueError, match=r"rule 'confidence' reads class probabilities"):
        model.early_exit_predict(**inputs, threshold=0.5)
    output = model.early_exit_predict(**inputs, rule="fixed", exit_layer=2)
    with torch.no_grad():
        torch.testing.assert_close(output.predictions, model(**inputs, output_layer_logits=True).layer_logits[1, :, 0])


def test_exit_config_is_saved_and_loaded_with_the_model(tmp_path):
    model = tiny_model("bert")
    model.exit_config = ExitConfig(rule="patience", patience=3, min_layer=2)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "exit_config.json").read_text())["patience"] == 3
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.exit_config == model.exit_config


@pytest.mark.parametrize("family", ["bert", "llama", "vit"])
@pytest.mark.parametrize("sharing", ["shared", "per_layer"])
def test_truncate_gives_the_layer_logits_and_saves_as_a_normal_checkpoint(family, sharing, tmp_path):
    model = tiny_model(family, classifier_sharing=sharing, layer_weights=[1.0, 2.0, 3.0, 4.0])
    inputs = tiny_inputs(family, padding_side=padding_for(family))
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    truncated = model.truncate(2)
    with torch.no_grad():  # layer 2's logits, to float rounding (the full model classifies all layers in one batch)
        torch.testing.assert_close(truncated(**inputs, early_exit=False).logits, layer_logits[1])
    assert truncated.num_layers == 2 and len(truncated.blocks) == 2
    assert truncated.config.layer_weights == [1.0, 2.0]
    assert model.num_layers == NUM_LAYERS  # the original is untouched
    truncated.save_pretrained(tmp_path)
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.base_config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, layer_logits[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"`num_layers=5` must be an integer between 1 and 4"):
        model.truncate(5)


def test_simulated_exits_match_online_early_exit():
    model = confident_model("llama")
    inputs = tiny_inputs("llama", batch_size=8, padding_side="left", seed=4)
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    # A threshold in the middle of the early layers' confidences, so that samples leave at different layers.
    threshold = layer_logits[:-1].softmax(-1).amax(-1).median().item()
    cases = [(ExitConfig(threshold=threshold), {"rule": "confidence", "threshold": threshold})]
    cases.append((ExitConfig(rule="patience", patience=1), {"rule": "patience", "patience": 1}))
    cases.append((ExitConfig(rule="agreement", threshold=threshold), {"rule": "agreement", "threshold": threshold}))
    for exit_config, rule in cases:
        logits, exit_layers = simulate_exits(layer_logits, exit_config)
        assert exit_layers.tolist() == reference_exits(layer_logits, **rule)
        assert len(set(exit_layers.tolist())) > 1, f"{rule}: every sample left at one layer, nothing was compacted"
        online = model.early_exit_predict(**inputs, exit_config=exit_config)
        assert exit_layers.tolist() == online.exit_layers.tolist()
        torch.testing.assert_close(logits, online.logits, atol=1e-5, rtol=1e-5)
        expected = layer_logits[exit_layers - 1, torch.arange(len(exit_layers))]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def labelled_batches(model, count=4, batch_size=8):
    """Batches labelled with the model's own last-layer predictions (flipped on one row in four)."""
    batches = []
    for seed in range(count):
        inputs = tiny_inputs("bert", batch_size=batch_size, seed=100 + seed)
        with torch.no_grad():
            labels = model(**inputs, output_layer_logits=True).logits.argmax(-1)
        labels[::4] = (labels[::4] + 1) % 3
        batches.append({**inputs, "labels": labels})
    return batches


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience"])
def test_empirical_calibration_chooses_the_fastest_setting_within_the_drop(rule, tmp_path):
    model = confident_model("bert")
    batches = labelled_batches(model)
    result = calibrate_exits(model, batches, max_accuracy_drop=0.05, rule=rule, method="empirical", risk="accuracy")
    inputs = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    labels = inputs.pop("labels")
    full_accuracy = (model(**inputs, output_layer_logits=True).logits.argmax(-1) == labels).float().mean().item()
    assert result.full_accuracy == pytest.approx(full_accuracy)
    online = model.early_exit_predict(**inputs)  # uses the calibrated exit config
    assert model.exit_config.rule == rule
    accuracy = (online.predictions == labels).float().mean().item()
    assert accuracy >= full_accuracy - 0.05 - 1e-6
    assert accuracy == pytest.approx(result.accuracy)
    assert online.exit_layers.float().mean().item() == pytest.approx(result.mean_exit_layer)
    admissible = [point for point in result.curve if point["accuracy"] >= full_accuracy - 0.05 - 1e-9]
    assert result.mean_exit_layer == min(point["mean_exit_layer"] for point in admissible)
    plot_calibration(result, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_calibration_rejects_bad_arguments():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"`rule='fixed'` cannot be calibrated"):
        calibrate_exits(model, [], rule="fixed")
    with pytest.raises(ValueError, match=r"`max_accuracy_drop=5` is a fraction"):
        calibrate_exits(model, [], max_accuracy_drop=5)
    with pytest.raises(ValueError, match=r"risk='accuracy' needs labelled data"):
        calibrate_exits(model, [tiny_inputs("bert")], risk="accuracy", method="empirical")


def test_inputs_that_cannot_be_shrunk_give_a_clear_error(monkeypatch):
    model = confident_model("llama")
    inputs = tiny_inputs("llama", batch_size=6, padding_side="left", seed=4)
    # Pretend compaction does not recognise the per-sample tensors: the next block then sees mismatched batches.
    monkeypatch.setattr("hf_aligned.early_exit._select_samples", lambda value, running, batch_size: value)
    with pytest.raises(ValueError, match=r"Early exit could not shrink the batch of this 'llama' model"):
        model.early_exit_predict(**inputs, threshold=0.9)
