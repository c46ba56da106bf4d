"""Serving: concurrent calls, pipelines at any batch size, calibrated checkpoints in every analysis path, strict inputs."""

import copy
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerControl, TrainerState, ViTConfig, ViTImageProcessor, default_data_collator, pipeline
from transformers.testing_utils import CaptureLogger

from hf_aligned import (
    AlignedConfig,
    AlignedForSequenceClassification,
    ExitConfig,
    RepresentationDynamicsCallback,
    classifier_layer_accuracy,
)
from hf_aligned.calibration import calibrate_exits
from hf_aligned.cli import main as cli_main
from hf_aligned.data import _explain_collate_errors
from hf_aligned.early_exit import logger as modeling_logger
from tests.test_callbacks import token_dataset, training_args
from tests.test_exits import confident_model
from tests.testing_utils import NUM_LAYERS, tiny_inputs, tiny_model, tiny_tokenizer

TEXTS = ["w1 w2 w3", "w5 w9", "w40 w41 w42 w43 w7", "w8", "w10 w11 w12 w13 w14 w15", "w3 w3", "w60 w2 w9 w4", "w7"]


def run_in_threads(function, arguments, repeats=15):
    """Calls `function(argument)` `repeats` times in one thread per argument, all threads started together."""
    barrier = threading.Barrier(len(arguments))
    results = [[] for _ in arguments]
    errors = []

    def work(index):
        barrier.wait()
        try:
            for _ in range(repeats):
                results[index].append(function(arguments[index]))
        except Exception as error:  # reported by the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(arguments))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def batches_of_different_sizes():
    return [tiny_inputs("bert", batch_size=size, seed=seed) for size, seed in ((4, 1), (6, 2), (3, 3))]


def test_concurrent_full_forwards_match_single_threaded_ones():
    model = confident_model("bert")
    batches = batches_of_different_sizes()
    with torch.no_grad():
        expected = [model(**batch, output_layer_logits=True).layer_logits for batch in batches]

    def call(index):
        with torch.no_grad():
            return model(**batches[index], output_layer_logits=True).layer_logits

    for index, results in enumerate(run_in_threads(call, [0, 1, 2])):
        for result in results:
            torch.testing.assert_close(result, expected[index], atol=1e-6, rtol=1e-6)


def test_concurrent_early_exits_match_single_threaded_ones():
    model = confident_model("bert")
    batches = batches_of_different_sizes()
    expected = [model.early_exit_predict(**batch, threshold=0.9) for batch in batches]
    assert any(output.exit_layers.min() < NUM_LAYERS for output in expected), "the test needs early exits"

    def call(index):
        return model.early_exit_predict(**batches[index], threshold=0.9)

    for index, results in enumerate(run_in_threads(call, [0, 1, 2])):
        for result in results:
            assert torch.equal(result.exit_layers, expected[index].exit_layers)
            assert result.layers_computed == expected[index].layers_computed
            torch.testing.assert_close(result.logits, expected[index].logits, atol=1e-6, rtol=1e-6)


def test_concurrent_pipelines_match_single_threaded_ones(tmp_path):
    model = confident_model("bert")
    model.exit_config = ExitConfig(threshold=0.9)
    classifier = pipeline("text-classification", model=model, tokenizer=tiny_tokenizer(tmp_path))
    inputs = [TEXTS[:5], TEXTS[3:], TEXTS[::-1]]
    expected = [classifier(texts, batch_size=3) for texts in inputs]

    for index, results in enumerate(run_in_threads(lambda index: classifier(inputs[index], batch_size=3), [0, 1, 2])):
        for result in results:
            assert [row["label"] for row in result] == [row["label"] for row in expected[index]]
            assert [row["score"] for row in result] == pytest.approx([row["score"] for row in expected[index]])


@pytest.mark.parametrize("exits", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_text_pipeline_at_any_batch_size(tmp_path, batch_size, exits):
    model = confident_model("bert")
    if exits:
        model.exit_config = ExitConfig(threshold=0.9)
    tokenizer = tiny_tokenizer(tmp_path)
    results = pipeline("text-classification", model=model, tokenizer=tokenizer)(TEXTS, batch_size=batch_size)
    assert len(results) == len(TEXTS)
    exit_layers = []
    for text, result in zip(TEXTS, results):
        alone = tokenizer(text, return_tensors="pt")
        if exits:
            output = model.early_exit_predict(**alone)
            logits = output.logits[0]
            exit_layers.append(output.exit_layers.item())
        else:
            with torch.no_grad():
                logits = model(**alone, output_layer_logits=True).layer_logits[-1, 0]
        assert result["label"] == model.config.id2label[logits.argmax().item()]
        assert result["score"] == pytest.approx(logits.softmax(-1).max().item(), abs=1e-5)
    if exits:
        assert min(exit_layers) < NUM_LAYERS, "the test needs early exits"


def tiny_vit(num_labels=3):
    base = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    model = AlignedForSequenceClassification(AlignedConfig(base_config=base, num_labels=num_labels)).eval()
    with torch.no_grad():
        model.classifier.heads[0].out_proj.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("exits", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_image_pipeline_at_any_batch_size(batch_size, exits):
    model = tiny_vit()
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(7)]
    if exits:  # a threshold half the images reach after block 1
        with torch.no_grad():
            first = model(**processor(images, return_tensors="pt"), output_layer_logits=True).layer_logits[0]
        model.exit_config = ExitConfig(threshold=first.softmax(-1).max(-1).values.median().item())
    classify = pipeline("image-classification", model=model, image_processor=processor, top_k=1)
    results = classify(images, batch_size=batch_size)
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    if exits:
        expected = model.early_exit_predict(pixel_values=pixel_values)
        logits = expected.logits
        assert expected.exit_layers.min() < NUM_LAYERS, "the test needs early exits"
    else:
        with torch.no_grad():
            logits = model(pixel_values=pixel_values, output_layer_logits=True).logits
    for result, row in zip(results, logits):
        assert result[0]["label"] == model.config.id2label[row.argmax().item()]
        assert result[0]["score"] == pytest.approx(row.softmax(-1).max().item(), abs=1e-5)


def test_default_forward_serves_only_inference_calls():
    model = confident_model("bert")
    model.exit_config = ExitConfig(threshold=0.9)
    inputs = tiny_inputs("bert", batch_size=6, seed=4)
    served = model.early_exit_predict(**inputs)
    with torch.no_grad():
        output = model(**inputs)
        full = model(**inputs, output_layer_logits=True)
    assert output.layer_logits is None
    assert torch.equal(output.exit_layers, served.exit_layers) and torch.equal(output.logits, served.logits)
    # The same inference call with gradients on exits early too: the grad mode does not decide.
    assert torch.equal(model(**inputs).exit_layers, served.exit_layers)
    # Layer logits, labels or train mode: the full forward whatever the exit rule.
    torch.testing.assert_close(model(**inputs, output_layer_logits=True).layer_logits, full.layer_logits)
    with torch.no_grad():
        labelled = model(**inputs, labels=torch.zeros(6, dtype=torch.long), output_layer_logits=True)
        assert labelled.layer_logits.shape == (NUM_LAYERS, 6, 3) and labelled.exit_layers is None
        assert model(**inputs, labels=torch.zeros(6, dtype=torch.long)).exit_layers is None
        assert model.train()(**inputs).exit_layers is None
    model.eval()
    # With exits off (the default), a plain call is the full forward: the last layer's logits, batch first.
    model.exit_config = ExitConfig()
    with torch.no_grad():
        output = model(**inputs)
    torch.testing.assert_close(output.logits, full.layer_logits[-1], atol=1e-6, rtol=1e-6)
    assert output.exit_layers is None and output.layer_logits is None
    with torch.no_grad():  # asked for, early exit still runs, every sample leaving at the last layer
        assert model(**inputs, early_exit=True).exit_layers.tolist() == [NUM_LAYERS] * 6
    with pytest.raises(ValueError, match=r"`early_exit=True` returns each sample's logits at its exit layer only"):
        model(**inputs, labels=torch.zeros(6, dtype=torch.long), early_exit=True)


@pytest.fixture
def calibrated_dir(tmp_path):
    """A tiny BERT whose calibrated `exit_config` lets samples leave, saved with a tokenizer."""
    model = confident_model("bert")
    dataset = token_dataset(48, seed=5)
    result = calibrate_exits(model, dataset, max_accuracy_drop=0.5, batch_size=16)
    assert not model.exit_config.never_exits and result.mean_exit_layer < NUM_LAYERS
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer(tmp_path / "model")
    return tmp_path / "model"


def independent_layer_accuracy(model, dataset):
    """Per-layer accuracy of the shared classifier, from `layer_logits` of one full batch (gradients on)."""
    batch = default_data_collator([dict(row) for row in dataset])
    labels = batch.pop("labels")
    layer_logits = model(**batch, output_layer_logits=True).layer_logits.detach()
    return (layer_logits.argmax(-1) == labels).double().mean(dim=1).tolist()


def test_analysis_paths_work_on_a_calibrated_checkpoint(calibrated_dir, tmp_path):
    model = AlignedForSequenceClassification.from_pretrained(calibrated_dir)
    assert not model.exit_config.never_exits
    dataset = token_dataset(30, seed=7)
    expected = independent_layer_accuracy(model, dataset)

    assert classifier_layer_accuracy(model, dataset, batch_size=7) == pytest.approx(expected, abs=1e-12)

    callback = RepresentationDynamicsCallback(dataset, batch_size=7, plot=False)
    state = TrainerState()
    state.is_world_process_zero = True
    callback.on_train_begin(training_args(tmp_path / "run"), state, TrainerControl(), model=model)
    assert callback.records[0]["classifier_accuracy"] == pytest.approx(expected, abs=1e-12)

    thresholds = [0.5, 0.7, 0.9, 1.0]
    again = calibrate_exits(model, dataset, max_accuracy_drop=0.5, batch_size=7, thresholds=thresholds)
    reference = calibrate_exits(model, dataset, max_accuracy_drop=0.5, batch_size=30, thresholds=thresholds)
    assert again.chosen == reference.chosen
    assert [point["mean_exit_layer"] for point in again.curve] == [
        point["mean_exit_layer"] for point in reference.curve
    ]

    data = tmp_path / "data.jsonl"
    rows = [
        {"sentence": " ".join(f"w{token}" for token in range(3, 3 + length)), "label": length % 2}
        for length in (2, 3, 4, 5, 6, 7)
    ]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    cli_main(["analyze", str(calibrated_dir), "--dataset", str(data), "--output", str(tmp_path / "analysis")])
    results = json.loads((tmp_path / "analysis" / "similarity.json").read_text())
    assert len(results["classifier_accuracy"]) == NUM_LAYERS


def test_export_of_forward_and_of_truncate_on_a_calibrated_checkpoint(calibrated_dir):
    model = AlignedForSequenceClassification.from_pretrained(calibrated_dir)
    inputs = tiny_inputs("bert", batch_size=4, seq_len=6, seed=3)
    with torch.no_grad():
        full = model(**inputs, output_layer_logits=True)
    exported = torch.export.export(model, (), {**inputs, "output_layer_logits": True})
    torch.testing.assert_close(
        exported.module()(**inputs, output_layer_logits=True)["layer_logits"], full.layer_logits
    )
    truncated = torch.export.export(model.truncate(2), (), dict(inputs))
    torch.testing.assert_close(truncated.module()(**inputs)["logits"], full.layer_logits[1], atol=1e-5, rtol=1e-5)


def test_unknown_arguments_are_named():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with pytest.raises(TypeError, match=r"\['treshold'\].*did you mean 'threshold' instead of 'treshold'"):
        model.early_exit_predict(**inputs, treshold=0.3)
    with pytest.raises(TypeError, match=r"forward\(\) got unexpected keyword arguments \['atention_mask'\]"):
        model(input_ids=inputs["input_ids"], atention_mask=inputs["attention_mask"])
    with pytest.raises(TypeError, match=r"forward\(\) does not take the ExitConfig fields \['threshold'\]"):
        model(**inputs, threshold=0.3)
    with pytest.raises(TypeError, match=r"\['bogus'\] are not ExitConfig fields"):
        ExitConfig().update(bogus=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rule": "fixed", "exit_layer": 2.5}, r"`exit_layer=2.5` must be an integer"),
        ({"rule": "fixed", "exit_layer": True}, r"`exit_layer=True` must be an integer"),
        ({"max_layer": 2.5}, r"`max_layer=2.5` must be an integer"),
        ({"min_layer": 1.0}, r"`min_layer=1.0` must be an integer"),
        ({"patience": 2.0, "rule": "patience"}, r"`patience=2.0` must be an integer"),
        ({"threshold": "0.9"}, r"`threshold='0.9'` must be a number"),
        ({"threshold": True}, r"`threshold=True` must be a number"),
    ],
)
def test_exit_config_fields_are_checked_by_type(fields, message):
    with pytest.raises(ValueError, match=message):
        ExitConfig(**fields)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"rule": "confidence", "thresh', r"exit_config\.json is not valid JSON"),
        ('{"rule": "confidence", "treshold": 0.9}', r"exit_config\.json has unknown keys \['treshold'\]"),
        ('{"rule": "fixed", "exit_layer": 2.5}', r"exit_config\.json: `exit_layer=2.5` must be an integer"),
        ("[0.9]", r"exit_config\.json must hold a JSON object"),
        ('{"rule": "fixed", "exit_layer": 9}', r"exit_config\.json of .*: `exit_layer=9` is deeper than the model"),
    ],
)
def test_bad_exit_config_files_name_the_file_and_the_field(tmp_path, content, message):
    tiny_model("bert").save_pretrained(tmp_path)
    (tmp_path / "exit_config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        AlignedForSequenceClassification.from_pretrained(tmp_path)


def test_missing_inputs_and_empty_batches_get_clear_errors():
    model = tiny_model("bert")
    empty = {"input_ids": torch.zeros(0, 5, dtype=torch.long)}
    for call in (model, model.early_exit_predict):
        with pytest.raises(ValueError, match=r"got no inputs: pass `input_ids` \(or `inputs_embeds`\)"):
            call()
        with pytest.raises(ValueError, match=r"got an empty batch \(`input_ids` of shape \(0, 5\)\)"):
            call(**empty)


def test_early_exit_in_train_mode_warns_once():
    model = tiny_model("bert").train()
    modeling_logger.warning_once.cache_clear()
    with CaptureLogger(modeling_logger) as captured:
        model.early_exit_predict(**tiny_inputs("bert"))
        model.early_exit_predict(**tiny_inputs("bert"))
    assert captured.out.count("early_exit_predict runs in train mode: dropout is active") == 1


def test_errors_unrelated_to_shrinking_pass_through():
    model = confident_model("bert")
    inputs = tiny_inputs("bert", batch_size=6, seed=4)
    assert model.early_exit_predict(**inputs, threshold=0.9).exit_layers.min() == 1, "the test needs exits at 1"

    def out_of_memory_once_shrunk(module, args):
        if args[0].shape[0] < 6:
            raise torch.OutOfMemoryError("out of memory")

    handle = model.blocks[1].register_forward_pre_hook(out_of_memory_once_shrunk)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
            model.early_exit_predict(**inputs, threshold=0.9)
    finally:
        handle.remove()


def test_collation_errors_blame_padding_only_for_ragged_samples():
    collate = _explain_collate_errors(default_data_collator)
    with pytest.raises(ValueError, match=r"\['input_ids'\] have different lengths from sample to sample"):
        collate([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}])
    equal_lengths = [{"input_ids": [1, 2], "label": "a"}, {"input_ids": [3, 4], "label": "b"}]
    with pytest.raises((ValueError, TypeError)) as error:
        collate(equal_lengths)
    assert "padding" not in str(error.value)


def test_model_card_failures_other_than_bad_files_pass_through(tmp_path, monkeypatch):
    from hf_aligned import model_card

    model = tiny_model("bert")
    model.save_pretrained(tmp_path)

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(model_card, "build_model_card", broken)
    with pytest.raises(KeyError, match="a bug"):
        model_card.write_model_card(tmp_path, model)


def test_pickled_and_copied_models_keep_working_hooks():
    model = confident_model("bert")
    inputs = tiny_inputs("bert", batch_size=6, seed=4)
    expected = model.early_exit_predict(**inputs, threshold=0.9)
    for copied in (copy.deepcopy(model), pickle_round_trip(model)):
        output = copied.early_exit_predict(**inputs, threshold=0.9)
        assert torch.equal(output.exit_layers, expected.exit_layers)
        torch.testing.assert_close(output.logits, expected.logits)
        assert all(len(block._forward_hooks) == 1 and len(block._forward_pre_hooks) == 1 for block in copied.blocks)


def pickle_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("exits_on", [False, True])
def test_what_a_call_returns_depends_on_arguments_and_config_never_on_the_grad_mode(exits_on):
    model = tiny_model("bert").eval()
    inputs = tiny_inputs("bert")
    if exits_on:
        model.exit_config = ExitConfig(rule="fixed", exit_layer=2)
    calls = {
        "plain": {},
        "layer logits": {"output_layer_logits": True},
        "labels": {"labels": torch.tensor([0, 1, 2])},
        "full": {"early_exit": False},
    }
    for name, arguments in calls.items():
        with torch.enable_grad():
            with_grad = model(**inputs, **arguments)
        with torch.no_grad():
            without = model(**inputs, **arguments)
        assert with_grad.keys() == without.keys(), name
        for key in with_grad:
            torch.testing.assert_close(with_grad[key].detach(), without[key], msg=f"{name}: {key}")
    plain = model(**inputs)
    assert plain.layer_logits is None and plain.logits.shape == (3, model.config.num_labels)  # batch first
    full = model(**inputs, output_layer_logits=True)
    assert full.layer_logits.shape == (NUM_LAYERS, 3, model.config.num_labels)
    if exits_on:  # an inference call exits early under the model's exit config, with or without gradients
        assert plain.exit_layers.tolist() == [2, 2, 2]
        torch.testing.assert_close(plain.logits, full.layer_logits[1])
    else:
        assert plain.exit_layers is None
        torch.testing.assert_close(plain.logits, full.layer_logits[-1])
    with pytest.raises(ValueError, match="`early_exit=True` returns each sample's logits at its exit layer only"):
        model(**inputs, early_exit=True, output_layer_logits=True)
