"""Training options beyond the paper: classifier updates from the last layer, self-distillation, the classifier's
learning rate; and the paper's own loss kept exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_aligned import AlignedConfig, AlignedForSequenceClassification, AlignedTrainer, AlignedTrainingArguments
from tests.testing_utils import NUM_LAYERS, tiny_base_config, tiny_inputs

FAMILIES_AND_POOLING = [("bert", "cls"), ("bert", "mean"), ("llama", "last"), ("vit", "cls")]


def dropout_free_model(family: str = "bert", seed: int = 0, **aligned_kwargs) -> AlignedForSequenceClassification:
    """A tiny aligned model in train mode with every dropout off, so two forwards give the same graph."""
    base = tiny_base_config(family)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(base, name):
            setattr(base, name, 0.0)
    aligned_kwargs.setdefault("num_labels", 3)
    torch.manual_seed(seed)
    config = AlignedConfig(base_config=base, classifier_dropout=0.0, **aligned_kwargs)
    return AlignedForSequenceClassification(config).train()


def labelled_inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = tiny_inputs(family, batch_size=5, seed=seed)
    labels = torch.tensor([0, 2, 1, -100, 2])
    return {**inputs, "labels": labels}


def gradients(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if name.startswith(prefix) and parameter.grad is not None
    }


def hand_cross_entropy(layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    kept = labels != -100
    return torch.stack([F.cross_entropy(logits[kept], labels[kept]) for logits in layer_logits])


# ---------------------------------------------------------------------------------------------------------------
# The paper's loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_paper_setting_is_the_weighted_sum_of_per_layer_cross_entropies(family):
    model = dropout_free_model(family, classifier_update="all", distillation_weight=0.0, layer_weights="linear")
    inputs = labelled_inputs(family)
    output = model(**inputs, output_layer_logits=True)
    assert output.layer_distillation_losses is None
    expected = hand_cross_entropy(output.layer_logits, inputs["labels"])
    weights = torch.tensor([2 * layer / (NUM_LAYERS * (NUM_LAYERS + 1)) for layer in range(1, NUM_LAYERS + 1)])
    torch.testing.assert_close(output.layer_losses, expected)
    torch.testing.assert_close(output.loss, (weights * expected).sum())
    # The loss is exactly the paper's formula on the model's own per-layer losses (what earlier releases returned).
    reference = (torch.tensor(model.config.resolved_layer_weights) * output.layer_losses).sum()
    assert torch.equal(output.loss, reference)


# ---------------------------------------------------------------------------------------------------------------
# classifier_update="last"
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "pooling"), FAMILIES_AND_POOLING)
def test_classifier_update_last_trains_the_classifier_from_the_last_layer_only(family, pooling):
    inputs = labelled_inputs(family)
    last_only = dropout_free_model(family, pooling=pooling, classifier_update="last")
    paper = copy.deepcopy(last_only)
    paper.config.classifier_update = "all"

    output = last_only(**inputs)
    output.loss.backward()
    reference = paper(**inputs)
    torch.testing.assert_close(output.layer_logits, reference.layer_logits)
    torch.testing.assert_close(output.loss, reference.loss)
    weights = torch.tensor(paper.config.resolved_layer_weights)

    # The classifier's gradient is the one of the last layer's weighted loss alone.
    (weights[-1] * reference.layer_losses[-1]).backward(retain_graph=True)
    expected_classifier = gradients(paper, "classifier.")
    assert set(expected_classifier) == set(gradients(last_only, "classifier."))
    for name, gradient in gradients(last_only, "classifier.").items():
        torch.testing.assert_close(gradient, expected_classifier[name], msg=name)

    # The backbone's gradient is the one of the whole aligned loss: earlier layers still fit the classifier.
    paper.zero_grad()
    reference.loss.backward()
    expected_backbone = gradients(paper, "backbone.")
    for name, gradient in gradients(last_only, "backbone.").items():
        torch.testing.assert_close(gradient, expected_backbone[name], msg=name)
    assert gradients(last_only, "backbone.").keys() == expected_backbone.keys()


def test_classifier_update_last_leaves_inference_unchanged():
    model = dropout_free_model(classifier_update="last").eval()
    inputs = tiny_inputs("bert")
    paper = copy.deepcopy(model)
    paper.config.classifier_update = "all"
    with torch.no_grad():
        assert torch.equal(
            model(**inputs, output_layer_logits=True).layer_logits,
            paper(**inputs, output_layer_logits=True).layer_logits,
        )


def test_classifier_update_last_needs_the_shared_classifier():
    with pytest.raises(ValueError, match=r"classifier_update='last'.*per_layer"):
        AlignedConfig(base_config=tiny_base_config("bert"), classifier_sharing="per_layer", classifier_update="last")
    with pytest.raises(ValueError, match="classifier_update='every'"):
        AlignedConfig(base_config=tiny_base_config("bert"), classifier_update="every")


# ---------------------------------------------------------------------------------------------------------------
# Self-distillation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_loss_equals_a_hand_computation(temperature):
    alpha = 0.3
    model = dropout_free_model(
        distillation_weight=alpha, distillation_temperature=temperature, layer_weights="uniform"
    )
    inputs = labelled_inputs("bert")
    output = model(**inputs, output_layer_logits=True)
    kept = inputs["labels"] != -100
    logits = output.layer_logits.detach()[:, kept]
    teacher = (logits[-1] / temperature).softmax(-1)
    expected_kd = []
    for layer_logits in logits:
        student = (layer_logits / temperature).softmax(-1)
        kl = (teacher * (teacher.log() - student.log())).sum(-1).mean()
        expected_kd.append(kl * temperature**2)
    expected_kd = torch.stack(expected_kd)
    torch.testing.assert_close(output.layer_distillation_losses.detach(), expected_kd)
    assert output.layer_distillation_losses[-1] == 0
    cross_entropy = hand_cross_entropy(output.layer_logits.detach(), inputs["labels"])
    per_layer = (1 - alpha) * cross_entropy + alpha * expected_kd
    per_layer[-1] = cross_entropy[-1]
    torch.testing.assert_close(output.loss.detach(), per_layer.mean())


def test_distillation_teacher_is_detached():
    model = dropout_free_model(distillation_weight=1.0)
    output = model(**labelled_inputs("bert"))
    # Layer 1's distillation term pulls layer 1 towards the last layer; the last block gets no gradient from it.
    output.layer_distillation_losses[0].backward()
    assert all(
        parameter.grad is None or parameter.grad.abs().max() == 0 for parameter in model.blocks[-1].parameters()
    )
    assert any(parameter.grad.abs().max() > 0 for parameter in model.blocks[0].parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distillation_weight": 1.5}, "distillation_weight=1.5"),
        ({"distillation_weight": True}, "distillation_weight=True"),
        ({"distillation_temperature": 0.0}, "distillation_temperature=0.0"),
        ({"distillation_temperature": "2"}, "distillation_temperature='2'"),
    ],
)
def test_bad_distillation_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignedConfig(base_config=tiny_base_config("bert"), **kwargs)


def test_distillation_refuses_regression():
    model = dropout_free_model(num_labels=1, distillation_weight=0.5)
    inputs = tiny_inputs("bert")
    with pytest.raises(ValueError, match=r"distillation_weight.*single-label"):
        model(**inputs, labels=torch.randn(3))


# ---------------------------------------------------------------------------------------------------------------
# Through the trainer: overrides, logged distillation losses, the classifier's learning rate
# ---------------------------------------------------------------------------------------------------------------


def tiny_dataset(num_samples: int = 12):
    from datasets import Dataset

    inputs = tiny_inputs("bert", batch_size=num_samples, seed=1)
    labels = inputs["input_ids"][:, 0] % 3
    return Dataset.from_dict({**{key: value.tolist() for key, value in inputs.items()}, "labels": labels.tolist()})


def aligned_args(tmp_path, **kwargs) -> AlignedTrainingArguments:
    defaults = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "seed": 0}
    return AlignedTrainingArguments(output_dir=str(tmp_path), **{**defaults, **kwargs})


def test_training_arguments_override_the_options_and_the_checkpoint_records_them(tmp_path):
    model = dropout_free_model()
    args = aligned_args(
        tmp_path, classifier_update="last", distillation_weight=0.25, distillation_temperature=3.0, max_steps=1
    )
    trainer = AlignedTrainer(model, args, train_dataset=tiny_dataset())
    assert (model.config.classifier_update, model.config.distillation_weight) == ("last", 0.25)
    assert model.config.distillation_temperature == 3.0
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AlignedConfig.from_pretrained(tmp_path / "saved")
    assert (reloaded.classifier_update, reloaded.distillation_weight, reloaded.distillation_temperature) == (
        "last",
        0.25,
        3.0,
    )


def test_a_bad_option_override_leaves_the_model_unchanged(tmp_path):
    model = dropout_free_model(classifier_sharing="per_layer")
    with pytest.raises(ValueError, match="classifier_update='last'"):
        AlignedTrainer(model, aligned_args(tmp_path, classifier_update="last", layer_weights="uniform"))
    assert (model.config.classifier_update, model.config.layer_weights) == ("all", "linear")


def test_distillation_losses_are_logged_per_layer(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    model = dropout_free_model(distillation_weight=0.5)
    dataset = tiny_dataset()
    recorder = Recorder()
    args = aligned_args(tmp_path, learning_rate=0.0, per_device_train_batch_size=12, max_steps=1, logging_steps=1)
    AlignedTrainer(model, args, train_dataset=dataset, callbacks=[recorder]).train()
    (log,) = [log for log in recorder.logs if "loss" in log]
    batch = {key: torch.tensor(dataset[key]) for key in dataset.column_names}
    expected = model(**batch).layer_distillation_losses.tolist()
    logged = [log[f"layer_{layer}_distillation_loss"] for layer in range(1, NUM_LAYERS)]
    assert logged == pytest.approx(expected[:-1], rel=1e-5)
    assert f"layer_{NUM_LAYERS}_distillation_loss" not in log
    assert f"layer_{NUM_LAYERS}_loss" in log


def test_classifier_lr_ratio_gives_the_new_classification_layer_its_own_parameter_group(tmp_path):
    model = dropout_free_model()
    args = aligned_args(tmp_path, learning_rate=1e-3, weight_decay=0.1, classifier_lr_ratio=50.0, max_steps=1)
    trainer = AlignedTrainer(model, args, train_dataset=tiny_dataset())
    optimizer = trainer.create_optimizer()
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = [
        (group["lr"], group["weight_decay"], {names[id(p)] for p in group["params"]})
        for group in optimizer.param_groups
    ]
    assert sorted(name for _, _, members in groups for name in members) == sorted(
        name for name, parameter in model.named_parameters() if parameter.requires_grad
    )
    by_name = {name: (lr, decay) for lr, decay, members in groups for name in members}
    assert by_name["classifier.heads.0.out_proj.weight"] == (pytest.approx(5e-2), 0.1)
    assert by_name["classifier.heads.0.out_proj.bias"] == (pytest.approx(5e-2), 0.0)
    assert by_name["classifier.heads.0.pooler.dense.weight"] == (pytest.approx(1e-3), 0.1)
    assert by_name["backbone.embeddings.word_embeddings.weight"] == (pytest.approx(1e-3), 0.1)
    # The schedule scales both rates alike and training uses the split groups.
    trainer.train()
    assert len(trainer.optimizer.param_groups) == 4
    assert sorted(group["initial_lr"] for group in trainer.optimizer.param_groups) == pytest.approx(
        [1e-3, 1e-3, 5e-2, 5e-2]
    )
    assert trainer.args.to_dict()["classifier_lr_ratio"] == 50.0


def test_classifier_lr_ratio_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="classifier_lr_ratio=0"):
        aligned_args(tmp_path, classifier_lr_ratio=0)


def test_paper_recipe_fills_every_unset_option_and_explicit_arguments_win(tmp_path):
    model = dropout_free_model(layer_weights="uniform", classifier_update="last", distillation_weight=0.5)
    args = aligned_args(tmp_path, recipe="paper", classifier_lr_ratio=3.0, max_steps=1)
    assert (args.layer_weights, args.classifier_update, args.distillation_weight) == ("linear", "all", 0.0)
    assert args.classifier_lr_ratio == 3.0  # given explicitly
    AlignedTrainer(model, args, train_dataset=tiny_dataset())
    assert (model.config.layer_weights, model.config.classifier_update, model.config.distillation_weight) == (
        "linear",
        "all",
        0.0,
    )
    assert aligned_args(tmp_path, recipe="paper").classifier_lr_ratio == 1.0
    with pytest.raises(ValueError, match=r"`recipe='papers'` is not a known recipe; use one of \['paper'\]"):
        aligned_args(tmp_path, recipe="papers")


def test_without_a_recipe_the_model_config_keeps_its_options(tmp_path):
    model = dropout_free_model(classifier_update="last", distillation_weight=0.5)
    AlignedTrainer(model, aligned_args(tmp_path, max_steps=1), train_dataset=tiny_dataset())
    assert (model.config.classifier_update, model.config.distillation_weight) == ("last", 0.5)


def test_default_classifier_rate_is_100x_on_a_pretrained_backbone_and_1x_from_a_config(tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_base_config("bert")).save_pretrained(tmp_path / "base")
    pretrained = AlignedForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    args = aligned_args(tmp_path / "a", learning_rate=1e-4, max_steps=1)
    assert args.classifier_lr_ratio is None
    trainer = AlignedTrainer(pretrained, args, train_dataset=tiny_dataset())
    assert trainer.classifier_lr_ratio == 100.0
    assert args.classifier_lr_ratio is None  # the arguments are left as given
    rates = {
        name: group["lr"]
        for group in trainer.create_optimizer().param_groups
        for name, parameter in pretrained.named_parameters()
        if any(parameter is member for member in group["params"])
    }
    assert rates["classifier.heads.0.out_proj.weight"] == pytest.approx(1e-2)
    assert rates["backbone.encoder.layer.0.attention.self.query.weight"] == pytest.approx(1e-4)

    # A model built from a config, and a reloaded aligned checkpoint (its classifier is trained), use one rate; the
    # optimizer keeps the same four groups whatever the ratio, so checkpoints resume across settings.
    from_config = dropout_free_model()
    trainer = AlignedTrainer(from_config, aligned_args(tmp_path / "b", max_steps=1), train_dataset=tiny_dataset())
    assert trainer.classifier_lr_ratio == 1.0
    assert len(trainer.create_optimizer().param_groups) == 4
    pretrained.save_pretrained(tmp_path / "aligned")
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path / "aligned")
    trainer = AlignedTrainer(reloaded, aligned_args(tmp_path / "c", max_steps=1), train_dataset=tiny_dataset())
    assert trainer.classifier_lr_ratio == 1.0


def test_classifier_lr_ratio_finds_the_classification_layer_under_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        dropout_free_model(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    args = aligned_args(tmp_path, learning_rate=1e-3, classifier_lr_ratio=10.0, max_steps=1)
    trainer = AlignedTrainer(model, args, train_dataset=tiny_dataset())
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    fast = {
        names[id(p)]
        for group in trainer.create_optimizer().param_groups
        if group["lr"] > 1e-3
        for p in group["params"]
    }
    assert fast and all("out_proj" in name and "modules_to_save" in name for name in fast)
    assert {name for name in names.values() if "out_proj" in name and "modules_to_save" in name} == fast


def test_options_that_train_from_the_last_layer_need_it_to_carry_a_loss(tmp_path):
    base = tiny_base_config("bert")
    for options in ({"classifier_update": "last"}, {"distillation_weight": 0.5}):
        with pytest.raises(ValueError, match="the last layer has weight 0"):
            AlignedConfig(base_config=base, aligned_layers=[1, 2, 3], **options)
        with pytest.raises(ValueError, match="the last layer has weight 0"):
            AlignedConfig(base_config=base, layer_weights=[1.0, 1.0, 1.0, 0.0], **options)
    model = dropout_free_model(classifier_update="last")
    with pytest.raises(ValueError, match="the last layer has weight 0"):
        AlignedTrainer(model, aligned_args(tmp_path, aligned_layers=[1, 2]))
    assert model.config.aligned_layers is None


def test_classifier_update_last_under_autocast_matches_the_paper_backbone_gradient():
    inputs = labelled_inputs("bert")
    last_only = dropout_free_model(classifier_update="last")
    paper = copy.deepcopy(last_only)
    paper.config.classifier_update = "all"
    for model in (last_only, paper):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs).loss.backward()
    for name, gradient in gradients(last_only, "backbone.").items():
        torch.testing.assert_close(gradient, gradients(paper, "backbone.")[name], msg=name, rtol=2e-2, atol=2e-3)
