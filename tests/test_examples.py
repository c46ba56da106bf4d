"""The example scripts end to end: run as a user runs them (`python ...`, `accelerate launch ...`), offline."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast

import hf_aligned  # noqa: F401 - registers the aligned model type with the Auto classes

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# A small ViT (2 blocks, width 16) on 128 digits, 4 optimizer steps of 16 images: seconds, yet every part runs.
TINY_VIT = [
    "--num_hidden_layers", "2", "--hidden_size", "16", "--num_attention_heads", "2", "--intermediate_size", "32",
    "--max_train_samples", "128", "--max_eval_samples", "50", "--max_steps", "4", "--logging_steps", "2", "--learning_rate", "3e-3",
    "--per_device_eval_batch_size", "8", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


def run_script(command: list[str], timeout: int = 240, environment: dict[str, str] | None = None) -> str:
    """Runs a command from the repository root with this interpreter's environment (and `environment`); returns
    stdout."""
    # One thread per process: these models are tiny, and spinning threads crawl when other jobs share the cores.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **(environment or {}),
    }
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    return completed.stdout


def layer_accuracies(metrics: dict) -> list[float]:
    """`eval_layer_{l}_accuracy` values in layer order (1, 2, ..., 10, 11: by number, not as text)."""
    layers = {
        int(key.split("_")[2]): value
        for key, value in metrics.items()
        if re.fullmatch(r"eval_layer_\d+_accuracy", key)
    }
    assert sorted(layers) == list(range(1, len(layers) + 1)), sorted(layers)
    return [layers[layer] for layer in sorted(layers)]


def test_image_example_trains_evaluates_and_saves(tmp_path):
    output = tmp_path / "vit"
    stdout = run_script(
        [sys.executable, "examples/run_image_classification.py", "--output_dir", str(output), "--layer_weights",
         "uniform", *TINY_VIT, "--calibration_split_percentage", "20", "--max_accuracy_drop", "0.1"]
    )  # fmt: skip
    metrics = json.loads((output / "eval_results.json").read_text())
    assert sorted(key for key in metrics if key.endswith("_accuracy")) == [
        "eval_accuracy",
        "eval_layer_1_accuracy",
        "eval_layer_2_accuracy",
    ]
    assert stdout.splitlines()[-1].split() == ["minimal", "depth", str(metrics["eval_minimal_depth"])]
    assert f"{metrics['eval_layer_1_accuracy']:.4f}" in stdout
    assert_calibrated(output, stdout, num_samples=288, num_evaluation=50)
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.layer_weights == "uniform"
    assert model.config.id2label[3] == "3"
    assert (output / "preprocessor_config.json").exists()


def assert_calibrated(output: Path, stdout: str, num_samples: int, num_evaluation: int) -> None:
    """The example calibrated its exits with a guarantee on the held-out split and scored them on the evaluation one."""
    calibration = json.loads((output / "exit_config.json").read_text())["calibration"]
    assert calibration["method"] == "ltt" and calibration["num_samples"] == num_samples
    scores = json.loads((output / "exit_evaluation.json").read_text())
    assert scores["num_samples"] == num_evaluation and scores["measured_speedup"] > 0
    assert sum(scores["exit_histogram"]) == num_evaluation
    assert f"calibrated on {num_samples} samples" in stdout
    assert f"evaluation ({num_evaluation} samples): accuracy {scores['full_accuracy']:.4f} at full depth" in stdout


def tiny_text_checkpoint(path: Path) -> Path:
    """A random 2-block BERT with a real WordPiece tokenizer over a tiny vocabulary."""
    words = ["good", "great", "fine", "bad", "awful", "dull", "movie", "plot", "a", "very", "the", "was"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def test_text_example_on_local_csv_with_string_labels(tmp_path):
    checkpoint = tiny_text_checkpoint(tmp_path / "bert")
    rows = [("a very good movie", "positive"), ("the plot was dull", "negative"), ("great", "positive")] * 8
    for name, subset in (("train.csv", rows), ("dev.csv", rows[:7])):
        lines = ["review,sentiment", *(f"{text},{label}" for text, label in subset)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    stdout = run_script(
        [sys.executable, "examples/run_text_classification.py", "--model_name_or_path", str(checkpoint),
         "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
         "--text_columns", "review", "--label_column", "sentiment", "--output_dir", str(output),
         "--classifier_sharing", "per_layer", "--max_steps", "3", "--per_device_train_batch_size", "8",
         "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
         "--calibration_split_percentage", "50", "--max_accuracy_drop", "0.2", "--calibration_delta", "0.2"]
    )  # fmt: skip
    assert "pooling: cls" in stdout
    metrics = json.loads((output / "eval_results.json").read_text())
    assert len(layer_accuracies(metrics)) == 2
    assert_calibrated(output, stdout, num_samples=12, num_evaluation=7)
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert model.config.classifier_sharing == "per_layer"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # The saved tokenizer cuts texts to the length training used (--max_seq_length, default 128).
    assert json.loads((output / "tokenizer_config.json").read_text())["model_max_length"] == 128


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_training_matches_one_process(tmp_path):
    # Two processes with 8 images each per step against one process with 16: accelerate deals batch 2k to rank 0 and
    # batch 2k+1 to rank 1 from the same shuffled order, and DDP averages the two gradients, so both runs see the same
    # global batches and gradients. Only the order of floating-point sums differs, hence the small tolerances.
    single, distributed = tmp_path / "single", tmp_path / "ddp"
    run_script(
        [sys.executable, "examples/run_image_classification.py", "--output_dir", str(single), "--use_cpu", "true",
         "--per_device_train_batch_size", "16", *TINY_VIT]
    )  # fmt: skip
    stdout = run_script(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         "examples/accelerate/ddp.yaml", "--main_process_port", str(free_port()),
         "examples/run_image_classification.py", "--output_dir", str(distributed), "--use_cpu", "true",
         "--per_device_train_batch_size", "8", *TINY_VIT]
    )  # fmt: skip
    assert stdout.count("minimal depth") == 1, "only the main process prints the table"
    single_metrics = json.loads((single / "eval_results.json").read_text())
    ddp_metrics = json.loads((distributed / "eval_results.json").read_text())
    assert layer_accuracies(ddp_metrics) == layer_accuracies(single_metrics)
    assert ddp_metrics["eval_minimal_depth"] == single_metrics["eval_minimal_depth"]
    # Per-layer losses are computed over the gathered predictions, so they match; Trainer's own `eval_loss` is a mean
    # of per-batch means and depends on how the 50 samples were split into batches.
    for key in ("eval_layer_1_loss", "eval_layer_2_loss"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-5), key
    # Training logs: per-layer losses gathered from both processes equal the single process's over the same batches.
    single_logs, ddp_logs = (
        [log for log in json.loads((path / "trainer_state.json").read_text())["log_history"] if "loss" in log]
        for path in (single, distributed)
    )
    assert len(ddp_logs) == len(single_logs) == 2
    for ddp_log, single_log in zip(ddp_logs, single_logs):
        for key in ("loss", "layer_1_loss", "layer_2_loss"):
            assert ddp_log[key] == pytest.approx(single_log[key], rel=1e-5), key
    single_weights = load_file(single / "model.safetensors")
    ddp_weights = load_file(distributed / "model.safetensors")
    assert single_weights.keys() == ddp_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert AutoConfig.from_pretrained(distributed).num_layers == 2


@pytest.mark.slow
def test_demo_prints_one_table_for_the_three_trainings_and_saves_a_plot(tmp_path):
    stdout = run_script([sys.executable, "examples/demo.py", "--output_dir", str(tmp_path), "--num_train_epochs", "1"])
    table = stdout[re.search(r"^layer +standard", stdout, flags=re.MULTILINE).start() :].splitlines()
    assert table[0].split() == ["layer", "standard", "aligned", "per-layer", "heads"]
    assert [line.split()[0] for line in table[1:9]] == [str(layer) for layer in range(1, 9)]
    assert table[9].startswith("minimal depth")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["standard", "aligned", "per-layer heads"]
    assert (tmp_path / "accuracy_vs_layer.png").stat().st_size > 10_000
    for folder, weights, sharing in (
        ("standard", "last", "shared"),
        ("aligned", "linear", "shared"),
        ("per_layer_heads", "linear", "per_layer"),
    ):
        config = AutoConfig.from_pretrained(tmp_path / folder)
        assert (config.layer_weights, config.classifier_sharing) == (weights, sharing)


def test_causal_lm_example_trains_a_small_model_from_a_config_and_saves_a_plain_checkpoint(tmp_path):
    texts = tmp_path / "texts.txt"
    words = ["the", "market", "team", "film", "won", "fell", "new", "game", "stocks", "is", "a", "good"]
    texts.write_text("\n".join(" ".join(words[(i * 7 + j) % 12] for j in range(9)) for i in range(200)) + "\n")
    output = tmp_path / "lm"
    stdout = run_script(
        [sys.executable, "examples/run_causal_lm.py", "--output_dir", str(output), "--model_type", "llama",
         "--config_overrides", "hidden_size=16,intermediate_size=32,num_hidden_layers=3,num_attention_heads=2,"
         "num_key_value_heads=2", "--train_tokenizer_vocab_size", "300", "--train_file", str(texts),
         "--block_size", "16", "--max_steps", "3", "--per_device_train_batch_size", "4", "--report_to", "none",
         "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true"]
    )  # fmt: skip
    assert "suggested assistant_early_exit:" in stdout or "no draft:" in stdout
    metrics = json.loads((output / "eval_results.json").read_text())
    assert all(f"eval_layer_{layer}_perplexity" in metrics for layer in (1, 2, 3))
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["aligned_training"]["layer_weights"] == "linear"
    assert "eval_layer_1_perplexity" not in (output / "README.md").read_text()  # the card shows a table instead
    assert "| 1 |" in (output / "README.md").read_text()
    # Built from a config: the saved tokenizer's length is the block size it was trained on.
    assert json.loads((output / "tokenizer_config.json").read_text())["model_max_length"] == 16


def test_causal_lm_example_trains_and_scores_the_end_of_text_separators(monkeypatch):
    import importlib.util

    from datasets import Dataset, DatasetDict
    from transformers import default_data_collator

    spec = importlib.util.spec_from_file_location("run_causal_lm", "examples/run_causal_lm.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look their module up
    spec.loader.exec_module(example)
    texts = [f"text {index} about the market" for index in range(20)]
    tokenizer = example.load_tokenizer(example.ModelArguments(train_tokenizer_vocab_size=300), texts)
    blocks = example.pack(DatasetDict({"train": Dataset.from_dict({"text": texts})}), tokenizer, 8)["train"]
    batch = default_data_collator([blocks[index] for index in range(len(blocks))])
    assert torch.equal(batch["labels"], batch["input_ids"])
    # Every separator the texts were joined with is a training target, none is masked.
    separators = (batch["input_ids"] == tokenizer.eos_token_id).sum()
    assert separators >= 15 and (batch["labels"] == tokenizer.eos_token_id).sum() == separators


def test_causal_lm_example_keeps_a_pretrained_tokenizers_length(tmp_path, monkeypatch):
    import importlib.util

    from hf_aligned import AlignedForCausalLM

    from .testing_utils import tiny_base_config

    spec = importlib.util.spec_from_file_location("run_causal_lm", "examples/run_causal_lm.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclasses look their module up
    spec.loader.exec_module(example)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text {index} about the market and the game" for index in range(60)) + "\n")
    tokenizer = example.load_tokenizer(example.ModelArguments(train_tokenizer_vocab_size=300), [texts.read_text()])
    tokenizer.model_max_length = 1024  # as GPT-2's
    config = tiny_base_config("gpt2")
    config.vocab_size, config.eos_token_id, config.pad_token_id = len(tokenizer), tokenizer.eos_token_id, 0
    AlignedForCausalLM.from_config(config).save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")
    output = tmp_path / "out"
    trainer, _ = example.run(
        ["--output_dir", str(output), "--model_name_or_path", str(tmp_path / "pretrained"), "--train_file",
         str(texts), "--block_size", "16", "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to",
         "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true"]
    )  # fmt: skip
    assert trainer.processing_class.model_max_length == 1024
    assert json.loads((output / "tokenizer_config.json").read_text())["model_max_length"] == 1024
