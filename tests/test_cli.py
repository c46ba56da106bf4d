"""The `hf-aligned` command line: `--help`, and `analyze` on tiny saved text and image models."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import tomllib
import torch
from PIL import Image
from transformers import BertTokenizerFast, DataCollatorWithPadding, ViTConfig, ViTImageProcessor

from hf_aligned import AlignedConfig, AlignedForSequenceClassification, layer_representations
from hf_aligned.cli import build_parser, main
from hf_aligned.cli_analyze import write_analysis

from .testing_utils import tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{index}" for index in range(60)]


def numpy_cos_matrix(reps: np.ndarray) -> np.ndarray:
    units = reps / np.linalg.norm(reps, axis=-1, keepdims=True)
    return np.einsum("ind,jnd->ij", units, units) / reps.shape[1]


def numpy_cka_matrix(reps: np.ndarray) -> np.ndarray:
    centered = reps - reps.mean(axis=1, keepdims=True)
    grams = np.einsum("ind,imd->inm", centered, centered)
    cross = np.einsum("inm,jnm->ij", grams, grams)
    with np.errstate(invalid="ignore"):  # a constant layer gives 0 / 0
        return cross / np.sqrt(np.outer(np.diag(cross), np.diag(cross)))


@pytest.fixture
def text_model_dir(tmp_path) -> Path:
    """A tiny aligned BERT saved with `save_pretrained`, with a word-level tokenizer built from a local vocab file."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    model_dir = tmp_path / "model"
    tiny_model("bert", num_labels=2, id2label={0: "negative", 1: "positive"}).save_pretrained(model_dir)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    return model_dir


def write_texts(path: Path, num_samples: int = 24, label_names: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(num_samples):
        words = rng.choice(WORDS, size=rng.integers(2, 9))
        label = int(index % 2)
        rows.append({"sentence": " ".join(words), "label": ["negative", "positive"][label] if label_names else label})
    if path.suffix == ".tsv":
        # Quote characters inside a sentence must not be taken for CSV quoting.
        rows[0]["sentence"] = 'w1 "w2 w3'
        path.write_text("sentence\tlabel\n" + "".join(f"{row['sentence']}\t{row['label']}\n" for row in rows))
    else:
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return rows


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "analyze" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "--dataset" in capsys.readouterr().out


def test_console_script_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["hf-aligned"].partition(":")
    assert (module, function) == ("hf_aligned.cli", "main")
    completed = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "analyze" in completed.stdout


def test_subcommands_are_one_subparser_each():
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "command")
    assert set(subparsers.choices) == {"analyze", "calibrate", "push"}
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a command is required


def test_analyze_text_model(text_model_dir, tmp_path, capsys):
    data = tmp_path / "data.tsv"
    rows = write_texts(data)
    output = tmp_path / "analysis"
    main(
        [
            "analyze",
            str(text_model_dir),
            "--dataset",
            str(data),
            "--output",
            str(output),
            "--probes",
            "--batch-size",
            "5",
        ]
    )

    results = json.loads((output / "similarity.json").read_text())
    assert results["num_samples"] == len(rows) == 24
    assert (output / "similarity.png").stat().st_size > 0
    assert (output / "layer_accuracy.png").stat().st_size > 0
    printed = capsys.readouterr()
    assert "mean off-diagonal COS" in printed.out
    # Long steps are announced on stderr, with a progress bar over the batches (24 samples, batch 5: 5 batches).
    for step in ("every layer's representation of 24 samples", "per-layer accuracy and linear probes", "saturation"):
        assert f"hf-aligned: {step} ..." in printed.err and f"hf-aligned: {step}: done in " in printed.err
    assert re.search(r"every layer's representation of 24 samples: +\d+%\|[^|]*\| \d/5 \[", printed.err)

    # The same numbers, computed independently from the model's representations.
    model = AlignedForSequenceClassification.from_pretrained(text_model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(text_model_dir)
    encoded = [dict(tokenizer(row["sentence"])) | {"labels": row["label"]} for row in rows]
    dataset = datasets.Dataset.from_list(encoded)
    reps = layer_representations(model, dataset, batch_size=7, collate_fn=DataCollatorWithPadding(tokenizer)).numpy()
    reps = reps.astype(np.float64)
    cos, cka = numpy_cos_matrix(reps), numpy_cka_matrix(reps)
    np.testing.assert_allclose(np.array(results["cos"]), cos, atol=1e-5)
    # Every sample starts with [CLS]: its embedding output is constant, CKA with it undefined (null in JSON).
    assert results["cka"][0] == [None] * 5
    np.testing.assert_allclose(np.array(results["cka"])[1:, 1:].astype(float), cka[1:, 1:], atol=1e-5)
    off_diagonal = ~np.eye(4, dtype=bool)
    assert results["off_diagonal_mean"]["cka"] == pytest.approx(cka[1:, 1:][off_diagonal].mean(), abs=1e-5)
    assert results["by_distance"]["cos"][0] == pytest.approx(np.diagonal(cos, 1).mean(), abs=1e-5)
    with torch.no_grad():
        batch = DataCollatorWithPadding(tokenizer)(encoded)
        labels = batch.pop("labels").numpy()
        logits = model(**batch, output_layer_logits=True).layer_logits.numpy()
    assert results["classifier_accuracy"] == pytest.approx((logits.argmax(-1) == labels).mean(axis=1), abs=1e-12)
    assert len(results["probe_accuracy"]["test_accuracy"]) == 5
    assert results["agreement"]["num_pairs"] == 6  # pairs of blocks 1..4


def test_analyze_maps_label_names_and_limits_samples(text_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    write_texts(data, label_names=True)
    output = tmp_path / "analysis"
    main(["analyze", str(text_model_dir), "--dataset", str(data), "--output", str(output), "--max-samples", "10"])
    results = json.loads((output / "similarity.json").read_text())
    assert results["num_samples"] == 10
    assert len(results["classifier_accuracy"]) == 4
    assert "probe_accuracy" not in results


def test_analyze_errors(text_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    write_texts(data)
    output = str(tmp_path / "analysis")
    with pytest.raises(ValueError, match="`--text-column body` is not a column"):
        main(["analyze", str(text_model_dir), "--dataset", str(data), "--text-column", "body", "--output", output])
    with pytest.raises(ValueError, match="no such file"):
        main(["analyze", str(text_model_dir), "--dataset", str(tmp_path / "missing.csv"), "--output", output])
    with pytest.raises(ValueError, match="only the split 'train'"):
        main(["analyze", str(text_model_dir), "--dataset", str(data), "--split", "test", "--output", output])
    names = tmp_path / "names.jsonl"
    names.write_text('{"sentence": "w1 w2", "label": "neutral"}\n{"sentence": "w3", "label": "positive"}\n')
    with pytest.raises(ValueError, match=r"Labels \['neutral'\] .* are not in the model's label2id"):
        main(["analyze", str(text_model_dir), "--dataset", str(names), "--output", output])
    with pytest.raises(SystemExit):
        main(["analyze", str(text_model_dir), "--dataset", str(data), "--output", output, "--batch-size", "0"])


def test_analyze_hub_dataset_name_goes_to_load_dataset(text_model_dir, tmp_path, monkeypatch):
    local = datasets.Dataset.from_list(write_texts(tmp_path / "data.jsonl"))
    calls = []

    def fake_load_dataset(name, config_name=None, **kwargs):
        calls.append((name, config_name))
        return datasets.DatasetDict({"train": local, "validation": local.select(range(8))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    output = tmp_path / "analysis"
    main(
        [
            "analyze",
            str(text_model_dir),
            "--dataset",
            "nyu-mll/glue",
            "--dataset-config",
            "sst2",
            "--output",
            str(output),
        ]
    )
    assert calls == [("nyu-mll/glue", "sst2")]
    assert json.loads((output / "similarity.json").read_text())["num_samples"] == 8  # the validation split


def test_analyze_base_checkpoint_skips_the_untrained_classifier(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    base_dir = tmp_path / "base"
    tiny_model("bert").backbone.save_pretrained(base_dir)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(base_dir)
    data = tmp_path / "data.jsonl"
    write_texts(data)
    main(["analyze", str(base_dir), "--dataset", str(data), "--output", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert "classifier_accuracy" not in results
    assert len(results["cka"]) == 5


def test_analyze_image_model(tmp_path):
    torch.manual_seed(0)
    base = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=37,
    )  # fmt: skip
    model_dir = tmp_path / "vit"
    AlignedForSequenceClassification(AlignedConfig(base_config=base, num_labels=2)).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(10)]
    data_dir = tmp_path / "images"
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(10)]}).save_to_disk(data_dir)
    output = tmp_path / "analysis"
    main(["analyze", str(model_dir), "--dataset", str(data_dir), "--output", str(output), "--batch-size", "4"])
    results = json.loads((output / "similarity.json").read_text())
    assert results["num_samples"] == 10
    assert len(results["classifier_accuracy"]) == 3

    model = AlignedForSequenceClassification.from_pretrained(model_dir)
    pixels = ViTImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")["pixel_values"]
    reps = layer_representations(model, [{"pixel_values": pixels}]).numpy().astype(np.float64)
    assert results["cka"][0] == [None] * 4  # the CLS token's embedding output does not depend on the image
    np.testing.assert_allclose(
        np.array(results["cka"])[1:, 1:].astype(float), numpy_cka_matrix(reps)[1:, 1:], atol=1e-5
    )


def test_calibrate_writes_the_certified_setting_beside_the_model(text_model_dir, tmp_path, capsys):
    from hf_aligned import calibrate_exits

    data = tmp_path / "calibration.jsonl"
    write_texts(data, num_samples=60)
    argv = ["calibrate", str(text_model_dir), "--data", str(data), "--max-accuracy-drop", "0.1", "--delta", "0.2"]
    assert main([*argv, "--risk", "accuracy"]) == 0
    saved = json.loads((text_model_dir / "exit_config.json").read_text())
    assert saved["calibration"]["method"] == "ltt" and saved["calibration"]["risk"] == "accuracy"
    assert saved["calibration"]["num_samples"] == 60
    assert (text_model_dir / "calibration.png").stat().st_size > 0
    assert "with 80% confidence, calibrated on 60 samples" in capsys.readouterr().out
    # The same choice as calibrating in Python on the same texts.
    model = AlignedForSequenceClassification.from_pretrained(text_model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(text_model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    inputs = tokenizer([row["sentence"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    labels = [row["label"] for row in rows]
    expected = calibrate_exits(
        layer_logits=layer_logits, labels=labels, max_accuracy_drop=0.1, delta=0.2, risk="accuracy"
    )
    assert json.loads((text_model_dir / "calibration.json").read_text())["chosen"] == expected.chosen
    with pytest.raises(ValueError, match=r"needs at least 230 samples .*got 60"):
        main(["calibrate", str(text_model_dir), "--data", str(data)])


def test_analyze_labels_its_plots_and_json_for_what_they_show(text_model_dir, tmp_path, monkeypatch):
    from hf_aligned import plotting

    drawn = {}
    for name in ("plot_layer_accuracy", "plot_similarity_heatmaps", "plot_probability_similarity"):
        original = getattr(plotting, name)

        def record(*args, _original=original, _name=name, **kwargs):
            drawn[_name] = _original(*args, **kwargs)
            return drawn[_name]

        monkeypatch.setattr(plotting, name, record)
    data = tmp_path / "test.tsv"
    write_texts(data)
    main(["analyze", str(text_model_dir), "--dataset", str(data), "--output", str(tmp_path / "out"), "--probes"])
    results = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert results["split"] is None and results["dataset"] == str(data)  # a data file has no split
    heatmap_axis = drawn["plot_similarity_heatmaps"].axes[0]
    assert heatmap_axis.get_xlabel() == heatmap_axis.get_ylabel() == "layer (0 = embeddings)"
    accuracy_axis = drawn["plot_layer_accuracy"].axes[0]
    lines = {line.get_label(): line for line in accuracy_axis.get_lines()}
    probe_name = f"linear probe ({results['probe_accuracy']['num_test']} held-out samples)"
    assert set(lines) == {"shared classifier (all 24 samples)", probe_name}
    assert list(lines[probe_name].get_xdata()) == [0, 1, 2, 3, 4]  # the probe's layer 0 is shown
    assert list(lines["shared classifier (all 24 samples)"].get_xdata()) == [1, 2, 3, 4]
    assert accuracy_axis.get_xlabel() == "layer (0 = embeddings)"
    colorbar = drawn["plot_probability_similarity"].axes[-1]
    ticks = colorbar.get_yticks()
    assert len(ticks) and all(float(tick).is_integer() for tick in ticks)


def test_analyze_plots_each_curve_from_the_first_layer_given_with_its_data(tmp_path, monkeypatch):
    from hf_aligned import plotting

    seen = {}

    def record(curves, path, first_layer, title):
        seen.update(curves=dict(curves), first_layer=dict(first_layer))

    monkeypatch.setattr(plotting, "plot_layer_accuracy", record)
    matrix = [[1.0, 0.5], [0.5, 1.0]]
    # The labels say nothing about where a curve starts: a "linear probe" label starting at 1, another at 0.
    curves = {"linear probe of blocks only": ([0.5, 0.6], 1), "from the embeddings": ([0.4, 0.5, 0.6], 0)}
    write_analysis(
        argparse.Namespace(output=str(tmp_path), model_dir="m"), {"cos": matrix, "cka": matrix}, curves, None
    )
    assert seen["first_layer"] == {"linear probe of blocks only": 1, "from the embeddings": 0}
    assert seen["curves"] == {"linear probe of blocks only": [0.5, 0.6], "from the embeddings": [0.4, 0.5, 0.6]}
