"""ASR scales: folding is exact on every family of the table, folded checkpoints are plain, gradients reach the scales,
the trainer saves plain checkpoints and trains on, and bad input is refused by message."""

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_aligned import (
    BRANCH_OUTPUTS,
    AlignedTrainer,
    AlignedTrainingArguments,
    ASRScale,
    add_asr,
    asr_folded_state_dict,
    asr_scales,
    fold_asr,
    has_asr,
)
from tests.test_layouts import family_inputs, tiny_config
from tests.testing_utils import tiny_base_config, tiny_inputs, tiny_model

TOLERANCE = 1e-5


def perturb(model, seed=1):
    """Random ASR MLPs: a freshly added ASR multiplies by exactly 1, which would hide any error in the folding."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ASRScale):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def hand_scale(scale):
    """An ASR scale computed by hand from its parameters: 2 * sigmoid(W2 relu(W1 v + b1) + b2)."""
    hidden = torch.clamp(scale.fc1.weight @ scale.input + scale.fc1.bias, min=0)
    return 2 / (1 + torch.exp(-(scale.fc2.weight @ hidden + scale.fc2.bias)))


def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("model_type", list(BRANCH_OUTPUTS))
def test_folding_is_exact_and_equals_scaling_the_projections_by_hand(model_type):
    torch.manual_seed(0)
    plain = AutoModel.from_config(tiny_config(model_type)).eval()
    model = copy.deepcopy(plain)
    inputs = family_inputs(model_type)
    add_asr(model, seed=0)
    assert torch.equal(outputs(model, inputs), outputs(plain, inputs))  # a new ASR multiplies by exactly 1
    assert all(torch.equal(scale, torch.ones_like(scale)) for scale in asr_scales(model).values())
    perturb(model)
    with_asr = outputs(model, inputs)
    # The same function written by hand: every listed projection of the plain model, its output rows scaled.
    by_hand = copy.deepcopy(plain)
    scaled = 0
    for name, projection in model.named_modules():
        if isinstance(getattr(projection, "asr", None), ASRScale):
            assert name.endswith(BRANCH_OUTPUTS[model_type])
            reference = by_hand.get_submodule(name)
            scale = hand_scale(projection.asr).detach()
            torch.testing.assert_close(asr_scales(model)[name], scale)
            with torch.no_grad():
                transposed = type(reference).__name__ == "Conv1D"  # GPT-2 stores (in, out)
                reference.weight.mul_(scale[None, :] if transposed else scale[:, None])
                if reference.bias is not None:
                    reference.bias.mul_(scale)
            scaled += 1
    assert scaled == 2 * tiny_config(model_type).num_hidden_layers
    assert (with_asr - outputs(plain, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(with_asr, outputs(by_hand, inputs), rtol=0, atol=TOLERANCE)
    folded_state = asr_folded_state_dict(model)
    fold_asr(model)
    assert not has_asr(model)
    assert not any(hook for module in model.modules() for hook in module._forward_hooks.values())
    assert model.state_dict().keys() == plain.state_dict().keys() == folded_state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in folded_state.items())
    torch.testing.assert_close(outputs(model, inputs), with_asr, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_folded_causal_lm_checkpoint_loads_with_plain_transformers(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_base_config(family)).eval()
    add_asr(model, seed=0)
    perturb(model)
    inputs = tiny_inputs(family, padding_side="left")
    with_asr = model(**inputs).logits.detach()
    fold_asr(model).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(reloaded(**inputs).logits.detach(), with_asr, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_folded_aligned_checkpoint_reloads_with_identical_layer_logits(family, tmp_path):
    model = add_asr(tiny_model(family), seed=0)
    perturb(model)
    inputs = tiny_inputs(family)
    with_asr = model(**inputs, output_layer_logits=True).layer_logits.detach()
    fold_asr(model).save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not has_asr(reloaded)
    torch.testing.assert_close(
        reloaded(**inputs, output_layer_logits=True).layer_logits.detach(), with_asr, rtol=0, atol=TOLERANCE
    )


def test_gradients_reach_every_asr_parameter():
    model = add_asr(tiny_model("bert"), seed=0).train()
    inputs = tiny_inputs("bert")
    # Fresh: the last layer starts at zero, so the gradient reaches it first (as in LoRA's zero-initialized B).
    model(**inputs, labels=torch.tensor([0, 1, 2])).loss.backward()
    fresh = {name: parameter.grad for name, parameter in model.named_parameters() if ".asr." in name}
    assert len(fresh) == 2 * 5 * 4  # 2 projections per block, 5 tensors each, 4 blocks
    assert all(grad.abs().sum() > 0 for name, grad in fresh.items() if ".fc2." in name)
    model.zero_grad()
    perturb(model)
    model(**inputs, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if ".asr." in name)


def test_copies_are_independent_and_fold_alone():
    model = add_asr(tiny_model("gpt2"), seed=0)
    perturb(model)
    inputs = tiny_inputs("gpt2", padding_side="left")
    before = model(**inputs, output_layer_logits=True).layer_logits.detach()
    copied = fold_asr(copy.deepcopy(model))
    assert has_asr(model) and not has_asr(copied)
    torch.testing.assert_close(model(**inputs, output_layer_logits=True).layer_logits.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(
        copied(**inputs, output_layer_logits=True).layer_logits.detach(), before, rtol=0, atol=TOLERANCE
    )


def checkpoint_keys(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def test_trainer_saves_plain_checkpoints_and_keeps_training(tmp_path):
    from datasets import Dataset

    model = add_asr(tiny_model("bert"), seed=0)
    inputs = tiny_inputs("bert", batch_size=8)
    rows = {"input_ids": inputs["input_ids"].tolist(), "attention_mask": inputs["attention_mask"].tolist()}
    train = Dataset.from_dict({**rows, "labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    snapshots = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            probe = tiny_inputs("bert")
            model.eval()  # no dropout in the probe; training goes on in train mode
            with torch.no_grad():
                snapshots[state.global_step] = (
                    model(**probe, output_layer_logits=True).layer_logits.clone(),
                    {name: p.detach().clone() for name, p in model.named_parameters() if ".asr." in name},
                )
            model.train()

    args = AlignedTrainingArguments(
        str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        fold_asr_on_save=True,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = AlignedTrainer(model, args, train_dataset=train, callbacks=[Snapshot()])
    trainer.train()
    assert trainer.state.global_step == 4 and has_asr(model)
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert not any(".asr." in key for key in checkpoint_keys(checkpoint))
        reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        torch.testing.assert_close(
            reloaded(**tiny_inputs("bert"), output_layer_logits=True).layer_logits.detach(),
            snapshots[step][0],
            rtol=0,
            atol=TOLERANCE,
        )
    # The ASR parameters trained on after the first save folded them.
    assert any(not torch.equal(snapshots[2][1][name], snapshots[4][1][name]) for name in snapshots[2][1])
    unfolded = AlignedTrainer(model, args.__class__(str(tmp_path / "raw"), report_to="none", use_cpu=True))
    unfolded.save_model(str(tmp_path / "raw"))
    assert any(".asr." in key for key in checkpoint_keys(tmp_path / "raw"))


def test_best_model_and_resumed_checkpoints_of_folded_runs_load_without_scaling_twice(tmp_path):
    from datasets import Dataset

    model = add_asr(tiny_model("bert"), seed=0)
    perturb(model)  # non-identity scales from the start, as after some training
    inputs = tiny_inputs("bert", batch_size=8)
    rows = {"input_ids": inputs["input_ids"].tolist(), "attention_mask": inputs["attention_mask"].tolist()}
    data = Dataset.from_dict({**rows, "labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    args = AlignedTrainingArguments(
        str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        fold_asr_on_save=True,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = AlignedTrainer(model, args, train_dataset=data, eval_dataset=data)
    trainer.train()
    probe = tiny_inputs("bert")

    def logits_of(loaded):
        with torch.no_grad():
            return loaded.eval()(**probe, output_layer_logits=True).layer_logits

    best = AutoModelForSequenceClassification.from_pretrained(trainer.state.best_model_checkpoint)
    torch.testing.assert_close(logits_of(model), logits_of(best), rtol=0, atol=TOLERANCE)
    # An in-process resume loads a checkpoint into the live model the same way.
    perturb(model, seed=2)
    other = tmp_path / "run" / "checkpoint-2"
    trainer._load_from_checkpoint(str(other))
    expected = logits_of(AutoModelForSequenceClassification.from_pretrained(other))
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=TOLERANCE)
    assert all(torch.equal(scale, torch.ones_like(scale)) for scale in asr_scales(model).values())


def test_unknown_family_names_the_override():
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("xlm"))
    with pytest.raises(ValueError, match=r"model type 'xlm'.*add_asr\(model, branch_outputs="):
        add_asr(model)
    assert not has_asr(model)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"branch_outputs": ["attention.output.nope"]}, ValueError, r"'attention.output.nope'.*block 1 .*no such"),
        ({"branch_outputs": ["attention.output.LayerNorm"]}, TypeError, r"LayerNorm in block 1.*only into linear"),
        ({"branch_outputs": "output.dense"}, ValueError, r"must be a non-empty list of paths"),
        ({"branch_outputs": []}, ValueError, r"must be a non-empty list of paths"),
        ({"reduction": 0}, ValueError, r"`reduction=0` must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused_and_change_nothing(kwargs, error, message):
    model = tiny_model("bert")
    with pytest.raises(error, match=message):
        add_asr(model, **kwargs)
    assert not has_asr(model)


def test_adding_twice_and_folding_nothing_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="has no ASR scales to fold; `add_asr"):
        fold_asr(model)
    add_asr(model)
    with pytest.raises(ValueError, match="has ASR scales already; `fold_asr"):
        add_asr(model)
