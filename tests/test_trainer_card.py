"""AlignedTrainer writes hf_aligned's model card, with the numbers of its latest evaluation."""

from huggingface_hub import ModelCard

from hf_aligned import AlignedTrainer
from tests.test_hub import table_rows
from tests.test_trainer import deterministic_model, toy_dataset, training_args


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
    assert trainer.args.classifier_lr_ratio is None  # left to the default: one rate for a model built from a config
    trainer.train()
    trainer.create_model_card(model_name="tiny-aligned")
    assert "| `classifier_lr_ratio` | `1.0` |" in ModelCard.load(tmp_path / "README.md").text
