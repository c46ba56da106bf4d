"""Model cards and Hub pushes, tested offline: the real huggingface_hub client talks to a loopback Hub server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants, metadata_load, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from transformers import BertTokenizer, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import hub as transformers_hub

from hf_aligned import (
    AlignedForCausalLM,
    AlignedForSequenceClassification,
    AlignedModelCardData,
    AlignedTrainer,
    AlignedTrainingArguments,
    HubPushError,
    build_model_card,
    push_aligned_model,
    write_model_card,
)
from hf_aligned.card_data import latest_eval_metrics, layer_metrics, training_hyperparameters
from hf_aligned.cli import add_push_command
from hf_aligned.model_card import logger

from .hub_server import LoopbackHub
from .testing_utils import NUM_LAYERS, tiny_base_config, tiny_model

REPO_ID = "aligned-user/tiny-aligned-bert"
TOKEN = "hf_loopback_test_token"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


def random_metrics(num_layers: int = NUM_LAYERS, seed: int = 0, prefix: str = "eval") -> dict[str, float]:
    """Trainer-style metrics with random per-layer accuracy and F1, a loss and a minimal depth."""
    generator = torch.Generator().manual_seed(seed)
    accuracy, f1 = torch.rand(2, num_layers, generator=generator, dtype=torch.float64).tolist()
    metrics = {f"{prefix}_loss": 0.42, f"{prefix}_minimal_depth": 3, f"{prefix}_runtime": 1.5}
    for layer in range(1, num_layers + 1):
        metrics[f"{prefix}_layer_{layer}_accuracy"] = accuracy[layer - 1]
        metrics[f"{prefix}_layer_{layer}_f1"] = f1[layer - 1]
    return metrics


def exit_config(rule: str = "confidence", threshold: float = 0.8, **fields) -> dict:
    """An exit rule as `ExitConfig.to_dict()` (and `exit_config.json`) holds it."""
    defaults = {"patience": 2, "exit_layer": None, "min_layer": 1, "max_layer": None}
    return {"rule": rule, "threshold": threshold, **defaults, **fields}


def calibration(thresholds=(0.5, 0.8, 0.95), chosen: float | None = 0.8) -> dict:
    """An exit calibration as `CalibrationResult.to_dict()` holds it: deeper exits at higher thresholds."""
    curve = []
    for index, threshold in enumerate(thresholds):
        depth = 1.6 + 2.2 * index / max(len(thresholds) - 1, 1)
        point = {"threshold": threshold, "accuracy": 0.8 + threshold / 10, "mean_exit_layer": depth}
        curve.append({**point, "expected_speedup": NUM_LAYERS / depth})
    result = {"rule": "confidence", "full_accuracy": 0.9, "num_layers": NUM_LAYERS, "curve": curve}
    return result if chosen is None else {**result, "chosen": chosen}


def sst2_card_data(**fields) -> AlignedModelCardData:
    """Card data as a training run on SST-2 with exit calibration would give it."""
    defaults = {
        "model_id": REPO_ID,
        "datasets": ["stanfordnlp/sst2"],
        "eval_split": "validation",
        "eval_metrics": random_metrics(),
        "exit_config": exit_config(),
        "calibration": calibration(),
    }
    return AlignedModelCardData(**{**defaults, **fields})


def table_rows(card_text: str, section: str) -> list[list[str]]:
    """The body rows of the first Markdown table under a `## section` heading, as lists of cell strings."""
    body = card_text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def hub(monkeypatch):
    """A loopback Hub with the real client pointed at it (endpoint, dummy token, online, no Xet)."""
    with LoopbackHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        # transformers keeps one HfApi, bound to the endpoint of its first use: each test starts without it.
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield server


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]))
    return BertTokenizer(vocab_file=str(vocab))


@pytest.fixture
def trained_dir(tmp_path, tokenizer):
    """A directory as a training run leaves it: model, tokenizer, metrics, exit rule, a plot and a checkpoint."""
    folder = tmp_path / "run"
    tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(random_metrics()))
    (folder / "exit_config.json").write_text(json.dumps(exit_config()))
    (folder / "calibration.json").write_text(json.dumps(calibration()))
    (folder / "plots").mkdir()
    (folder / "plots" / "layer_accuracy.png").write_bytes(PNG_BYTES)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"optimizer state")
    return folder


# Card data.


def test_layer_metrics_groups_trainer_metrics_by_layer():
    metrics = {"eval_layer_2_accuracy": 0.7, "eval_layer_10_f1": 0.5, "eval_layer_2_f1": 0.6, "eval_loss": 0.3}
    metrics |= {"test_layer_1_accuracy": 0.1, "eval_layer_3_name": "not a number", "eval_layer_4_accuracy": True}
    assert layer_metrics(metrics) == {2: {"accuracy": 0.7, "f1": 0.6}, 10: {"f1": 0.5}}
    assert list(layer_metrics(metrics)) == [2, 10]
    assert layer_metrics(metrics, prefix="test") == {1: {"accuracy": 0.1}}


def test_latest_eval_metrics_reads_the_last_per_layer_evaluation():
    history = [
        {"loss": 1.0, "step": 1},
        {"eval_layer_1_accuracy": 0.5, "eval_loss": 0.9, "step": 2},
        {"eval_layer_1_accuracy": 0.7, "eval_loss": 0.6, "step": 4},
        {"loss": 0.4, "step": 5},
    ]
    assert latest_eval_metrics(history) == {"eval_layer_1_accuracy": 0.7, "eval_loss": 0.6, "step": 4}
    assert latest_eval_metrics(history, prefix="test") == {}


def test_training_hyperparameters_keeps_optimization_settings_and_subclass_fields(tmp_path):
    @dataclasses.dataclass
    class MyArguments(TrainingArguments):
        layer_weight_warmup: int = 3

    args = MyArguments(output_dir=str(tmp_path), learning_rate=3e-5, num_train_epochs=2, seed=7, report_to="none")
    shown = training_hyperparameters(args.to_dict())
    assert shown["learning_rate"] == 3e-5
    assert shown["num_train_epochs"] == 2
    assert shown["seed"] == 7
    assert shown["layer_weight_warmup"] == 3
    assert "output_dir" not in shown
    assert "logging_steps" not in shown
    assert "max_steps" not in shown  # -1 means "use the epochs"
    assert "fp16" not in shown


def test_card_shows_per_layer_results_minimal_depth_and_exit_tradeoff():
    metrics = random_metrics(seed=3)
    text = str(build_model_card(tiny_model("bert"), sst2_card_data(eval_metrics=metrics)))

    rows = table_rows(text, "Accuracy after each layer")
    assert [row[0] for row in rows] == ["1", "2", "3 (minimal depth)", "4"]
    for layer, row in enumerate(rows, start=1):
        assert float(row[1]) == pytest.approx(metrics[f"eval_layer_{layer}_accuracy"], abs=5e-5)
        assert float(row[2]) == pytest.approx(metrics[f"eval_layer_{layer}_f1"], abs=5e-5)
    assert f"The task needs **3 of {NUM_LAYERS} layers**" in text

    rows = table_rows(text, "Early exit")
    assert [row[0] for row in rows] == ["0.5", "0.8 (chosen)", "0.95"]
    for row, point in zip(rows, calibration()["curve"]):
        assert float(row[1]) == pytest.approx(point["accuracy"], abs=5e-5)
        assert float(row[2]) == pytest.approx(point["mean_exit_layer"], abs=5e-3)
        assert float(row[3].rstrip("x")) == pytest.approx(point["expected_speedup"], abs=5e-3)
    assert "used by `early_exit_predict` and by pipelines): `rule=confidence`, `threshold=0.8`." in text
    assert "Calibration of the `confidence` rule on validation data (accuracy at\nfull depth: 0.9000)" in text
    assert f'from_pretrained("{REPO_ID}")' in text
    assert "outputs = model.early_exit_predict(**inputs)\n" in text


def test_card_metadata_carries_per_layer_model_index(tmp_path):
    metrics = random_metrics()
    data = sst2_card_data(eval_metrics=metrics, language="en", license="apache-2.0", tags=["sentiment"])
    path = tmp_path / "README.md"
    build_model_card(tiny_model("bert"), data).save(path)

    metadata = metadata_load(path)
    assert metadata["library_name"] == "hf-aligned"
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["license"] == "apache-2.0"
    assert metadata["language"] == "en"
    assert metadata["datasets"] == ["stanfordnlp/sst2"]
    assert metadata["metrics"] == ["accuracy", "f1"]
    assert {"hf-aligned", "early-exit", "bert", "sentiment"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a randomly initialized base model has no Hub id

    card = ModelCard.load(path)
    results = {result.metric_name: result for result in card.data.eval_results}
    assert card.data.model_name == REPO_ID
    for layer in range(1, NUM_LAYERS + 1):
        for metric in ("accuracy", "f1"):
            result = results[f"Layer {layer} {metric}"]
            assert result.metric_type == metric
            assert result.metric_value == metrics[f"eval_layer_{layer}_{metric}"]
            assert (result.task_type, result.dataset_type, result.dataset_split) == (
                "text-classification",
                "stanfordnlp/sst2",
                "validation",
            )
    chosen = calibration()["curve"][1]
    early_exit = results[f"Early-exit accuracy (confidence 0.8, {chosen['expected_speedup']:.2f}x speed-up)"]
    assert early_exit.metric_value == chosen["accuracy"]
    assert len(results) == 2 * NUM_LAYERS + 1  # losses and runtimes stay out of the model-index


def test_card_reads_base_model_task_and_classifier_from_config(tmp_path):
    model = tiny_model("vit", classifier_sharing="per_layer", layer_weights="uniform", aligned_layers=[2, 4])
    model.config.base_config._name_or_path = "google/vit-base-patch16-224"
    card = build_model_card(model)
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert card.data.pipeline_tag == "image-classification"
    assert "AutoImageProcessor.from_pretrained" in card.text
    assert "standard multi-exit baseline: one classifier per layer" in card.text
    assert "uniform on layers 2, 4 (0.000, 0.500, 0.000, 0.500)" in card.text
    assert "each layer's classifier trained by its own layer's loss; no self-distillation" in card.text
    assert card.data.eval_results is None
    assert "model_name" not in card.data.to_dict()

    local = tmp_path / "my-base"
    local.mkdir()
    model.config.base_config._name_or_path = str(local)
    card = build_model_card(model.config)
    assert card.data.base_model is None
    assert f"a `vit` checkpoint from the local folder `{tmp_path.name}/my-base`" in card.text


def test_card_records_the_training_options():
    model = tiny_model("bert", classifier_update="last", distillation_weight=0.25, distillation_temperature=3.0)
    text = build_model_card(model).text
    assert (
        "**Training options:** shared classifier updated by the last layer's loss only (`classifier_update='last'`); "
        "self-distillation towards the last layer with weight 0.25 at temperature 3" in text
    )
    assert "updated by every layer's loss (`classifier_update='all'`); no self-distillation" in (
        build_model_card(tiny_model("bert", classifier_update="all", distillation_weight=0.0)).text
    )


def test_card_reads_the_exit_rule_from_the_model_and_marks_it_on_the_curve():
    class ExitConfig:  # stands in for hf_aligned's ExitConfig: anything with `to_dict`
        def __init__(self, **fields):
            self.fields = fields

        def to_dict(self):
            return exit_config(**self.fields)

    config = tiny_model("bert").config
    model = types.SimpleNamespace(config=config, exit_config=ExitConfig(threshold=0.5, min_layer=2))
    text = build_model_card(model, AlignedModelCardData(calibration=calibration(chosen=None))).text
    assert "`rule=confidence`, `threshold=0.5`, `min_layer=2`." in text  # unused fields (patience, ...) left out
    assert [row[0] for row in table_rows(text, "Early exit")] == ["0.5 (chosen)", "0.8", "0.95"]

    patience = exit_config(rule="patience", threshold=1.0, patience=3)
    curve = {**calibration(thresholds=(1, 2, 3), chosen=None), "rule": "patience"}
    text = build_model_card(config, AlignedModelCardData(exit_config=patience, calibration=curve)).text
    assert "`rule=patience`, `patience=3`." in text
    assert table_rows(text, "Early exit")[2][0] == "3 (chosen)"
    assert "| Patience | Accuracy | Mean exit layer | Speed-up |" in text

    # The default rule (confidence 1.0) never exits: the card says nothing about a saved rule.
    text = build_model_card(types.SimpleNamespace(config=config, exit_config=ExitConfig(threshold=1.0))).text
    assert "## Early exit" not in text
    assert "outputs = model.early_exit_predict(**inputs, threshold=0.9)" in text


def test_card_lists_a_long_calibration_curve_in_brief():
    thresholds = [round(0.5 + index / 200, 3) for index in range(100)]
    data = AlignedModelCardData(
        exit_config=exit_config(threshold=thresholds[37]), calibration=calibration(thresholds, None)
    )
    text = build_model_card(tiny_model("bert"), data).text
    shown = [row[0] for row in table_rows(text, "Early exit")]
    assert len(shown) == 11  # 10 spread over the curve, first and last included, plus the chosen setting
    assert shown[0] == f"{thresholds[0]:g}"
    assert shown[-1] == f"{thresholds[-1]:g}"
    assert f"{thresholds[37]:g} (chosen)" in shown
    assert "11 of the 100 settings\ntried are listed" in text


def test_card_rejects_data_that_contradicts_the_model():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="results for layer 5, but the model has 4 layers"):
        build_model_card(model, AlignedModelCardData(eval_metrics={"eval_layer_5_accuracy": 0.9}))
    with pytest.raises(ValueError, match=r"`minimal_depth=7` is outside the model's layers 1..4"):
        build_model_card(model, AlignedModelCardData(minimal_depth=7))
    bad_curve = {"curve": [{"threshold": 0.9, "accuracy": 0.8}]}
    with pytest.raises(
        ValueError, match=r"`calibration\['curve'\]\[0\]` lacks \['mean_exit_layer', 'expected_speedup'\]"
    ):
        build_model_card(model, AlignedModelCardData(calibration=bad_curve))
    with pytest.raises(TypeError, match=r"`calibration\['curve'\]` must be a list of dicts"):
        AlignedModelCardData(calibration={"curve": {"threshold": 0.9}})
    with pytest.raises(TypeError, match=r"`exit_config` must be a dict or have a `to_dict\(\)` method, got float"):
        AlignedModelCardData(exit_config=0.9)
    with pytest.raises(TypeError, match="`eval_metrics` must be a dict"):
        AlignedModelCardData(eval_metrics=[0.9])
    with pytest.raises(TypeError, match="must be an aligned model or an `AlignedConfig`, got BertConfig"):
        build_model_card(model.config.base_config)


def test_write_model_card_fills_from_directory_and_never_raises(trained_dir):
    model = AlignedForSequenceClassification.from_pretrained(trained_dir)
    path = write_model_card(trained_dir, model, AlignedModelCardData(model_id=REPO_ID))
    assert path == trained_dir / "README.md"
    card = ModelCard.load(path)
    metrics = json.loads((trained_dir / "eval_results.json").read_text())
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results["Layer 2 accuracy"] == metrics["eval_layer_2_accuracy"]
    assert [row[0] for row in table_rows(card.text, "Early exit")] == ["0.5", "0.8 (chosen)", "0.95"]
    assert "![layer accuracy](plots/layer_accuracy.png)" in card.text

    bad = AlignedModelCardData(eval_metrics={"eval_layer_9_accuracy": 0.5})
    with CaptureLogger(logger) as captured:
        assert write_model_card(trained_dir, model, bad) is None
    assert "Could not write the model card" in captured.out
    assert "layer 9" in captured.out
    assert ModelCard.load(path).text == card.text  # the earlier card is left as it was


# Pushes through the loopback Hub.


def test_push_aligned_model_uploads_the_saved_files_in_one_commit(hub, trained_dir):
    before = snapshot(trained_dir)
    info = push_aligned_model(trained_dir, REPO_ID, private=True)

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.summary) == (REPO_ID, "main", "Upload aligned model")
    assert hub.repos[REPO_ID]["visibility"] == "private"
    assert [route for route, _ in hub.requests] == ["create", "validate-yaml", "preupload", "commit"]
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert info.oid and info.commit_url.startswith(hub.endpoint)

    expected = {path: content for path, (content, _) in before.items() if not path.startswith("checkpoint-")}
    uploaded = dict(commit.files)
    card = uploaded.pop("README.md").decode()
    assert uploaded == expected
    assert {"config.json", "model.safetensors", "exit_config.json", "calibration.json", "tokenizer.json"} <= set(
        uploaded
    )
    assert snapshot(trained_dir) == before  # the card is uploaded, not written locally

    metrics = json.loads(expected["eval_results.json"])
    rows = table_rows(card, "Accuracy after each layer")
    for layer, row in enumerate(rows, start=1):
        assert float(row[1]) == pytest.approx(metrics[f"eval_layer_{layer}_accuracy"], abs=5e-5)
    assert f'from_pretrained("{REPO_ID}")' in card
    assert ModelCard(card).data.library_name == "hf-aligned"


def test_push_keeps_an_existing_card_unless_card_data_is_given(hub, trained_dir):
    (trained_dir / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    push_aligned_model(trained_dir, REPO_ID)
    assert hub.files(REPO_ID)["README.md"] == (trained_dir / "README.md").read_bytes()

    push_aligned_model(trained_dir, REPO_ID, card_data=AlignedModelCardData(license="apache-2.0"))
    card = ModelCard(hub.files(REPO_ID)["README.md"].decode())
    assert card.data.license == "apache-2.0"
    assert "Layer 1 accuracy" in {result.metric_name for result in card.data.eval_results}
    assert (trained_dir / "README.md").read_text().endswith("# My own card\n")


def test_push_to_a_branch_or_pull_request(hub, trained_dir):
    push_aligned_model(trained_dir, REPO_ID, revision="v1", commit_message="First version")
    assert hub.branches == [(REPO_ID, "v1")]
    assert hub.commits[-1].revision == "v1"
    assert hub.commits[-1].summary == "First version"

    info = push_aligned_model(trained_dir, REPO_ID, create_pr=True)
    assert hub.commits[-1].create_pr
    assert info.pr_url is not None


def test_model_push_to_hub_uploads_model_tokenizer_plots_and_our_card(hub, tmp_path, tokenizer):
    model = tiny_model("bert")
    plot = tmp_path / "cka_matrix.png"
    plot.write_bytes(PNG_BYTES)
    metrics = random_metrics(seed=1)
    data = AlignedModelCardData(eval_metrics=metrics, datasets=["stanfordnlp/sst2"])

    model.push_to_hub(REPO_ID, processing_class=tokenizer, card_data=data, plots=[plot], tags=["demo"])

    reference = tmp_path / "reference"
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    expected = {path: content for path, (content, _) in snapshot(reference).items()}
    expected["plots/cka_matrix.png"] = PNG_BYTES
    assert len(hub.commits) == 1
    uploaded = dict(hub.commits[0].files)
    card = ModelCard(uploaded.pop("README.md").decode())
    assert uploaded == expected
    assert hub.commits[0].summary == "Upload AlignedForSequenceClassification"

    # transformers' own push would have replaced the card with a generic one; ours carries the results.
    assert card.data.library_name == "hf-aligned"
    assert "demo" in card.data.tags
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results == {
        f"Layer {layer} {metric}": metrics[f"eval_layer_{layer}_{metric}"]
        for layer in range(1, NUM_LAYERS + 1)
        for metric in ("accuracy", "f1")
    }
    assert "![cka matrix](plots/cka_matrix.png)" in card.text
    assert f'AutoTokenizer.from_pretrained("{REPO_ID}")' in card.text
    reloaded = AlignedForSequenceClassification.from_pretrained(reference)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_push_that_gets_a_server_error_raises_and_keeps_the_local_save(hub, trained_dir):
    hub.fail["commit"] = 500
    before = snapshot(trained_dir)
    with pytest.raises(HubPushError, match=rf"{REPO_ID}.*failed: HfHubHTTPError: Server error '500") as error:
        push_aligned_model(trained_dir, REPO_ID)
    assert "commit failed on purpose" in str(error.value)
    assert hub.commits == []
    assert snapshot(trained_dir) == before


def test_model_push_that_fails_raises_a_clear_error(hub):
    hub.fail["create"] = 403
    with pytest.raises(HubPushError, match=rf"Pushing to the Hub repository '{REPO_ID}' .*403"):
        tiny_model("bert").push_to_hub(REPO_ID)
    assert hub.commits == []


def test_push_that_times_out_raises_and_keeps_the_local_save(hub, trained_dir):
    def client_with_timeout():
        client = default_client_factory()
        client.timeout = 0.5
        return client

    hub.stall.add("commit")
    before = snapshot(trained_dir)
    set_client_factory(client_with_timeout)
    try:
        with pytest.raises(HubPushError, match=rf"{REPO_ID}.*failed: ReadTimeout"):
            push_aligned_model(trained_dir, REPO_ID)
    finally:
        set_client_factory(default_client_factory)
    assert hub.commits == []
    assert snapshot(trained_dir) == before


def test_push_rejects_bad_input_before_contacting_the_hub(hub, tmp_path, trained_dir):
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        push_aligned_model(tmp_path / "missing", REPO_ID)
    with pytest.raises(ValueError, match="is not a valid Hub repository id"):
        push_aligned_model(trained_dir, "not/a/valid/id")
    plain = tmp_path / "plain-bert"
    tiny_model("bert").config.base_config.save_pretrained(plain)
    with pytest.raises(ValueError, match="holds a 'bert' model, not an aligned one"):
        push_aligned_model(plain, REPO_ID)
    with pytest.raises(ValueError, match="`plots` names files that do not exist"):
        tiny_model("bert").push_to_hub(REPO_ID, plots=[tmp_path / "nope.png"])
    assert hub.requests == []


def test_push_command(hub, trained_dir, capsys):
    parser = argparse.ArgumentParser(prog="hf-aligned")
    add_push_command(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["push", str(trained_dir), REPO_ID, "--dataset", "stanfordnlp/sst2", "--license", "mit"])
    assert args.run(args) == 0
    assert capsys.readouterr().out.strip() == f"{hub.endpoint}/{REPO_ID}/commit/{hub.commits[0].oid}"
    card = ModelCard(hub.files(REPO_ID)["README.md"].decode())
    assert card.data.datasets == ["stanfordnlp/sst2"]
    assert card.data.license == "mit"
    assert hub.repos[REPO_ID].get("visibility") is None

    hub.fail["commit"] = 500
    args = parser.parse_args(["push", str(trained_dir), REPO_ID, "--private"])
    assert args.run(args) == 1
    assert f"error: Pushing to the Hub repository '{REPO_ID}'" in capsys.readouterr().err


def test_push_in_offline_mode_says_so(hub, trained_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match=rf"'{REPO_ID}'.*failed: OfflineModeIsEnabled: .*offline mode is enabled"):
        push_aligned_model(trained_dir, REPO_ID)
    assert hub.requests == []


def test_causal_lm_save_pretrained_pushes_the_plain_config(hub, tmp_path):
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_base_config("llama", num_layers=2), layer_weights="uniform")
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO_ID, commit_message="aligned llama")
    uploaded = hub.files(REPO_ID)
    config = json.loads(uploaded["config.json"])
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["aligned_training"]["layer_weights"] == "uniform"
    assert uploaded["config.json"] == (tmp_path / "out" / "config.json").read_bytes()
    assert hub.commits[-1].summary == "aligned llama"


def test_trainer_cards_and_pushes_a_lora_wrapped_causal_lm(hub, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_base_config("llama", num_layers=2))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    args = AlignedTrainingArguments(
        output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, hub_model_id=REPO_ID, save_strategy="no"
    )
    trainer = AlignedTrainer(model, args)
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card
    trainer.push_to_hub(commit_message="lora llama")
    uploaded = hub.files(REPO_ID)
    assert uploaded["README.md"].decode() == card
    assert "adapter_config.json" in uploaded and hub.commits[-1].summary == "lora llama"


def test_card_links_only_hub_datasets():
    names = ["../shared/data/sst2/train.tsv", "BBC News", "bbc/news.csv", "SetFit/bbc-news"]
    card = build_model_card(tiny_model("bert"), AlignedModelCardData(datasets=names))
    assert "- **Dataset:** `../shared/data/sst2/train.tsv`, `BBC News`, `bbc/news.csv`, " in card.text
    assert "[SetFit/bbc-news](https://huggingface.co/datasets/SetFit/bbc-news)" in card.text
    assert card.text.count("huggingface.co/datasets/") == 1 and card.data.datasets == ["SetFit/bbc-news"]


def test_classifier_save_pretrained_pushes_through_the_same_path_with_our_card(hub, tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO_ID, commit_message="aligned bert")
    uploaded = hub.files(REPO_ID)
    assert uploaded["config.json"] == (tmp_path / "out" / "config.json").read_bytes()
    assert "exit_config.json" in uploaded and hub.commits[-1].summary == "aligned bert"
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "hf-aligned" and "Accuracy after each layer" not in card.text  # no metrics yet
    assert str(build_model_card(model, AlignedModelCardData(model_id=REPO_ID))) == uploaded["README.md"].decode()
