"""AlignedTrainer writes hf_aligned's model card, with the numbers of its latest evaluation."""

import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import BertModel

from hf_aligned import AlignedForCausalLM, AlignedForSequenceClassification, AlignedTrainer
from tests.test_hub import table_rows
from tests.test_trainer import deterministic_model, toy_dataset, training_args
from tests.testing_utils import tiny_base_config


def test_trainer_card_reports_the_evaluated_layers(tmp_path):
    dataset = toy_dataset()
    trainer = AlignedTrainer(
        model=deterministic_model(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.create_model_card(model_name="tiny-aligned", license="apache-2.0")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf-aligned"
    assert card.data.license == "apache-2.0"
    rows = table_rows(card.text, "Accuracy after each layer")
    depth = metrics["eval_minimal_depth"]
    expected = [
        [
            f"{layer} (minimal depth)" if layer == depth else str(layer),
            f"{metrics[f'eval_layer_{layer}_accuracy']:.4f}",
        ]
        for layer in range(1, 5)
    ]
    assert [row[:2] for row in rows] == expected
    assert f"**Minimal depth:** {metrics['eval_minimal_depth']} of 4 layers" in card.text


def test_trainer_card_lists_the_classifier_rate_the_run_used(tmp_path):
    dataset = toy_dataset()
    trainer = AlignedTrainer(deterministic_model(), training_args(tmp_path, max_steps=1), train_dataset=dataset)
    # Left to the default: one rate for a model built from a config, recorded in the trainer's copy of the arguments.
    assert trainer.args.classifier_lr_ratio == 1.0
    trainer.train()
    trainer.create_model_card(model_name="tiny-aligned")
    assert "| `classifier_lr_ratio` | `1.0` |" in ModelCard.load(tmp_path / "README.md").text


def test_the_default_classifier_rate_of_a_pretrained_backbone_is_saved_and_carded(tmp_path):
    BertModel(tiny_base_config("bert")).save_pretrained(tmp_path / "base")
    model = AlignedForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    args = training_args(tmp_path / "run", max_steps=1)
    trainer = AlignedTrainer(model, args, train_dataset=toy_dataset())
    assert args.classifier_lr_ratio is None  # the caller's arguments stay as given
    trainer.train()
    trainer.save_model()
    saved = torch.load(tmp_path / "run" / "training_args.bin", weights_only=False)
    assert saved.classifier_lr_ratio == 100.0
    trainer.create_model_card(model_name="tiny-aligned")
    card = ModelCard.load(tmp_path / "run" / "README.md").text
    assert "| `classifier_lr_ratio` | `100.0` |" in card
    assert "a `bert` checkpoint from the local folder `" in card and "/base`" in card
    assert "- **Dataset:**" not in card


def test_causal_card_shows_what_ran_and_no_classifier_settings(tmp_path):
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_base_config("llama", num_layers=2))
    blocks = Dataset.from_dict({"input_ids": torch.randint(3, 99, (4, 8)).tolist()}).map(
        lambda row: {"labels": row["input_ids"]}
    )
    args = training_args(tmp_path, max_steps=6, per_device_train_batch_size=2)
    trainer = AlignedTrainer(model, args, train_dataset=blocks)
    trainer.train()
    trainer.create_model_card(dataset_tags="local-texts.txt", dataset="../data/local-texts.txt")
    card = (tmp_path / "README.md").read_text()
    assert "- epochs_run: 3.0" in card and "- steps_run: 6" in card and "- max_steps: 6" in card
    assert "num_train_epochs" not in card
    for setting in ("classifier_lr_ratio", "fold_asr_on_save", "recipe", "distillation", "classifier_update"):
        assert setting not in card, setting
    assert "https://huggingface.co/datasets/" not in card
