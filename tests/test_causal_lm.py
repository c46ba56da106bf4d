"""AlignedForCausalLM: the aligned next-token loss, plain checkpoints, self-speculative decoding and the trainer."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, pipeline

from hf_aligned import (
    CAUSAL_LM_HEADS,
    AlignedForCausalLM,
    AlignedModelCardData,
    AlignedTrainer,
    AlignedTrainingArguments,
    build_causal_lm_card,
    resolve_layer_weights,
    suggest_assistant_early_exit,
)

from .testing_utils import DECODER_FAMILIES, FINAL_NORM, VOCAB_SIZE, tiny_base_config, tiny_tokenizer

NUM_LAYERS = 4


def tiny_causal_lm(family: str, seed: int = 0, **settings):
    torch.manual_seed(seed)
    config = tiny_base_config(family, num_layers=NUM_LAYERS)
    model = AlignedForCausalLM.from_config(config, **settings)
    return model.eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)


def hand_layer_losses(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every block's mean next-token cross-entropy, from the plain model's `output_hidden_states`: the model's final
    norm and LM head on each block's output (the last entry of `hidden_states` is already normed)."""
    family = model.config.model_type
    base = model.transformer if family == "gpt2" else model.model
    norm = getattr(base, FINAL_NORM[family])
    outputs = model(input_ids=input_ids, output_hidden_states=True)
    targets = labels[:, 1:].reshape(-1)
    losses = []
    for layer in range(1, NUM_LAYERS + 1):
        hidden = outputs.hidden_states[layer]
        logits = model.lm_head(hidden if layer == NUM_LAYERS else norm(hidden))
        losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB_SIZE), targets, ignore_index=-100))
    return torch.stack(losses)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_aligned_loss_equals_a_hand_computation_with_ignored_labels(family):
    model = tiny_causal_lm(family, layer_weights="linear", loss_chunk_size=5)
    input_ids = tokens()
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    out = model(input_ids=input_ids, labels=labels)
    expected = hand_layer_losses(model, input_ids, labels)
    weights = torch.tensor(resolve_layer_weights("linear", NUM_LAYERS))
    torch.testing.assert_close(out.layer_losses, expected)
    torch.testing.assert_close(out.loss, (weights * expected).sum())
    assert out.logits.shape == (2, 9, VOCAB_SIZE)
    # The gradient through the chunked, recomputed loss equals the gradient of the hand computation.
    out.loss.backward()
    grads = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    model.zero_grad()
    (weights * hand_layer_losses(model, input_ids, labels)).sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, msg=name)


def test_last_layer_weights_give_the_plain_model_loss_and_evaluation_reports_agreement():
    model = tiny_causal_lm("llama", layer_weights="last")
    input_ids = tokens()
    out = model(input_ids=input_ids, labels=input_ids)
    plain = LlamaForCausalLM.forward(model, input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(out.loss, plain.loss)
    assert torch.isnan(out.layer_losses[:-1]).all()  # weight 0 in training: not computed
    with torch.no_grad():
        plain_call = model(input_ids=input_ids, labels=input_ids)
        evaluated = model(input_ids=input_ids, labels=input_ids, output_layer_agreement=True)
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    # Without gradients the same call returns the same: what is computed depends on the arguments, not the grad mode.
    assert torch.isnan(plain_call.layer_losses[:-1]).all() and plain_call.layer_agreement is None
    torch.testing.assert_close(plain_call.loss, out.loss)
    torch.testing.assert_close(evaluated.layer_losses, hand_layer_losses(model, input_ids, input_ids))
    top_last = evaluated.logits[:, :-1].argmax(-1)
    for layer in range(1, NUM_LAYERS):
        top = model.lm_head(model.model.norm(hidden[layer]))[:, :-1].argmax(-1)
        assert evaluated.layer_agreement[layer - 1].item() == pytest.approx((top == top_last).float().mean().item())
    assert evaluated.layer_agreement[-1] == 1


def test_layers_per_step_draws_layers_with_unbiased_weights():
    model = tiny_causal_lm("llama", layer_weights="linear", layers_per_step=1).train()
    input_ids = tokens()
    with torch.no_grad():
        full = hand_layer_losses(model, input_ids, input_ids)
    weights = resolve_layer_weights("linear", NUM_LAYERS)
    drawn = set()
    torch.manual_seed(0)
    for _ in range(12):
        out = model(input_ids=input_ids, labels=input_ids)
        computed = [layer for layer in range(1, NUM_LAYERS) if not torch.isnan(out.layer_losses[layer - 1])]
        assert len(computed) == 1
        (layer,) = computed
        assert out.layer_computed.tolist() == [index in (layer, NUM_LAYERS) for index in range(1, NUM_LAYERS + 1)]
        drawn.add(layer)
        # The drawn layer counts (earlier aligned layers / drawn) = 3 times, so the mean over draws is the full loss.
        expected = weights[-1] * full[-1] + 3 * weights[layer - 1] * full[layer - 1]
        torch.testing.assert_close(out.loss.detach(), expected)
    assert drawn == {1, 2, 3}


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_saved_checkpoint_is_plain_and_reloads_with_its_settings(family, tmp_path):
    model = tiny_causal_lm(family, layer_weights="uniform", aligned_layers=[2, 4])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    plain_class = type(model).__mro__[2].__name__
    assert saved["architectures"] == [plain_class]
    assert saved["aligned_training"]["aligned_layers"] == [2, 4]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(plain).__name__ == plain_class and not isinstance(plain, AlignedForCausalLM)
    input_ids = tokens()
    with torch.no_grad():
        assert torch.equal(plain(input_ids).logits, model(input_ids).logits)
    if family == "llama":  # the text-generation pipeline serves the checkpoint as it serves the base model
        tiny_tokenizer(tmp_path)
        generator = pipeline("text-generation", model=str(tmp_path), max_new_tokens=4, do_sample=False)
        assert generator("w1 w2 w3")[0]["generated_text"].startswith("w1 w2 w3")
    reloaded = AlignedForCausalLM.from_pretrained(tmp_path)
    assert reloaded.alignment == model.alignment
    assert AlignedForCausalLM.from_pretrained(tmp_path, layer_weights="last").alignment.layer_weights == "last"
    # `config` may be a path, as for transformers' own `from_pretrained`.
    assert AlignedForCausalLM.from_pretrained(tmp_path, config=str(tmp_path)).alignment == model.alignment


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_self_speculative_greedy_output_equals_plain_greedy(family):
    model = tiny_causal_lm(family, seed=3)
    prompt = tokens(batch=1, length=5, seed=4)
    settings = {"max_new_tokens": 24, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    plain = model.generate(prompt, **settings)
    assert plain.shape[1] == 5 + 24
    for layer in range(1, NUM_LAYERS):
        assert torch.equal(model.generate(prompt, assistant_early_exit=layer, **settings), plain), layer
    # The draft's own settings (a fixed draft length, no confidence stop) change the speed, never the tokens.
    drafts = {"num_assistant_tokens": 3, "assistant_confidence_threshold": 0.0}
    assert torch.equal(model.generate(prompt, assistant_early_exit=1, **drafts, **settings), plain)
    # The draft really runs `layer` blocks (GPT-2's forward would otherwise run them all), through the same head.
    with torch.no_grad():
        hidden = model(prompt, output_hidden_states=True).hidden_states
        torch.testing.assert_close(model.early_exit_draft(2)(prompt).logits, model.layer_logits(hidden[2]))
    assert model.config.num_hidden_layers == NUM_LAYERS and len(model.aligned_blocks) == NUM_LAYERS


def test_labels_with_return_dict_false_give_the_output_as_a_tuple():
    model = tiny_causal_lm("llama")
    input_ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids)
        as_tuple = model(input_ids=input_ids, labels=input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected.to_tuple())
    for got, wanted in zip(as_tuple, expected.to_tuple()):
        torch.testing.assert_close(got, wanted, equal_nan=True)


def test_transformers_own_early_exit_drafts_with_the_predictor_the_aligned_loss_trains(tmp_path):
    # transformers' `assistant_early_exit` on a plain checkpoint drafts by running the model with
    # `config.num_hidden_layers = k` (EarlyExitCandidateGenerator): for a Llama that is block k's output through the
    # model's final norm and LM head, exactly the layer-k predictor whose loss AlignedForCausalLM trains.
    model = tiny_causal_lm("llama", seed=3)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = tokens(batch=1, length=5, seed=4)
    with torch.no_grad():
        hidden = model(prompt, output_hidden_states=True).hidden_states
        for layer in range(1, NUM_LAYERS):
            plain.config.num_hidden_layers = layer
            draft_logits = plain(prompt).logits
            plain.config.num_hidden_layers = NUM_LAYERS
            torch.testing.assert_close(draft_logits, model.layer_logits(hidden[layer]), msg=str(layer))
            labels = prompt.clone()
            loss = F.cross_entropy(draft_logits[0, :-1], labels[0, 1:])
            torch.testing.assert_close(model(input_ids=prompt, labels=labels).layer_losses[layer - 1], loss)
    settings = {"max_new_tokens": 16, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    expected = model.generate(prompt, **settings)
    assert torch.equal(plain.generate(prompt, assistant_early_exit=1, **settings), expected)


def test_bad_settings_and_calls_are_errors_naming_the_fix():
    model = tiny_causal_lm("gpt2")
    prompt = tokens(batch=1, length=4)
    with pytest.raises(ValueError, match=r"`assistant_early_exit=4` must be an integer between 1 and 3"):
        model.generate(prompt, max_new_tokens=2, assistant_early_exit=4)
    with pytest.raises(ValueError, match="either `assistant_early_exit` or `assistant_model`"):
        model.generate(prompt, max_new_tokens=2, assistant_early_exit=1, assistant_model=model)
    with pytest.raises(TypeError, match=r"unknown settings \['layer_weight'\]"):
        model.configure_alignment(layer_weight="linear")
    with pytest.raises(ValueError, match="`layers_per_step=0` must be a positive integer"):
        model.configure_alignment(layers_per_step=0)
    assert model.alignment.layers_per_step is None  # the bad value changed nothing
    with pytest.raises(TypeError, match=r"`aligned_layers=3` must be a list of 1-based block numbers"):
        model.configure_alignment(aligned_layers=3)
    with pytest.raises(TypeError, match=r"`layer_weights=0.5` must be a scheme name"):
        model.configure_alignment(layer_weights=0.5)
    assert model.alignment.aligned_layers is None and model.alignment.layer_weights == "linear"
    with pytest.raises(ValueError, match="without `use_cache=True`"):
        model(input_ids=prompt, labels=prompt, use_cache=True)
    with pytest.raises(ValueError, match="'bert' is not a decoder-only language model"):
        AlignedForCausalLM.from_config(tiny_base_config("bert"))


def test_suggested_early_exit_follows_the_cost_model():
    # Layer 1 agrees half the time, layer 2 always: drafting with layer 2 (cost 1/2 per token) is exact and wins.
    estimate = suggest_assistant_early_exit([0.5, 1.0, 1.0, 1.0], max_assistant_tokens=4)
    assert estimate.assistant_early_exit == 2 and estimate.num_assistant_tokens == 4
    assert estimate.expected_speedup == pytest.approx(5 / (4 * 0.5 + 1))
    # With no agreement anywhere, even the least bad draft (1 token for cost 1/3 + 1) loses: no draft suggested.
    assert suggest_assistant_early_exit([0.0, 0.0, 1.0], max_assistant_tokens=3) is None
    with pytest.raises(ValueError, match="one value in \\[0, 1\\] per block"):
        suggest_assistant_early_exit([1.2, 1.0])
    # Layer 1 of 2 agreeing 90% of the time: a one-token draft gives 1.9 tokens for 1.5 steps; with a per-step draft
    # overhead of 0.6 every draft length costs more than it yields (best: 1.9 / 2.1 at g = 1).
    estimate = suggest_assistant_early_exit([0.9, 1.0], max_assistant_tokens=1)
    assert estimate.expected_speedup == pytest.approx(1.9 / 1.5)
    assert suggest_assistant_early_exit([0.9, 1.0], draft_overhead=0.6) is None
    with pytest.raises(ValueError, match=r"`max_assistant_tokens=0` must be a positive integer"):
        suggest_assistant_early_exit([0.5, 1.0], max_assistant_tokens=0)
    with pytest.raises(ValueError, match=r"`draft_overhead=-5` must be a finite non-negative"):
        suggest_assistant_early_exit([0.5, 1.0], draft_overhead=-5)


@pytest.mark.parametrize("agreement", [[0.0, 0.1, 0.2, 1.0], [0.9, 0.95, 0.99, 1.0]])
def test_causal_card_suggests_a_draft_only_when_one_is_expected_to_help(agreement):
    model = tiny_causal_lm("llama")
    metrics = {f"eval_layer_{layer}_agreement": value for layer, value in enumerate(agreement, start=1)}
    card = str(build_causal_lm_card(model, AlignedModelCardData(eval_metrics=metrics)))
    suggestion = suggest_assistant_early_exit(agreement)
    if suggestion is None:
        assert "assistant_early_exit=" not in card and "No draft suggested" in card
        assert "model.generate(**inputs, max_new_tokens=40)" in card
    else:
        assert f"expected {suggestion.expected_speedup:.2f}x" in card and suggestion.expected_speedup > 1
        assert f"max_new_tokens=40, assistant_early_exit={suggestion.assistant_early_exit})" in card


def test_trainer_trains_with_accumulation_and_evaluates_every_layer(tmp_path):
    model = tiny_causal_lm("llama").train()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, VOCAB_SIZE, (12, 8), generator=generator)
    lengths = [8, 5, 7, 8, 6, 8, 8, 4, 8, 8, 7, 8]
    data = Dataset.from_dict({"input_ids": [row[:length].tolist() for row, length in zip(rows, lengths)]})

    def collate(examples):
        width = max(len(example["input_ids"]) for example in examples)
        ids = torch.zeros(len(examples), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, example in enumerate(examples):
            ids[index, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            mask[index, : len(example["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    args = AlignedTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        layer_weights="uniform",
        use_cpu=True,
    )
    trainer = AlignedTrainer(model, args, train_dataset=data, eval_dataset=data, data_collator=collate)
    assert model.alignment.layer_weights == "uniform"  # the arguments' override is recorded in the config
    trainer.train()
    assert "layer_1_loss" in trainer.state.log_history[0]
    metrics = trainer.evaluate()
    # Independent computation: token-weighted per-layer losses and agreement over the whole set, batch by batch.
    model.eval()
    sums, agree, count = torch.zeros(NUM_LAYERS), torch.zeros(NUM_LAYERS), 0
    with torch.no_grad():
        for start in range(0, 12, 5):
            batch = collate([data[index] for index in range(start, min(start + 5, 12))])
            losses = hand_layer_losses(model, batch["input_ids"], batch["labels"])
            counted = int((batch["labels"][:, 1:] != -100).sum())
            out = model(**batch, output_layer_agreement=True)
            sums += losses * counted
            agree += out.layer_agreement * counted
            count += counted
    for layer in range(1, NUM_LAYERS + 1):
        loss = (sums[layer - 1] / count).item()
        assert metrics[f"eval_layer_{layer}_loss"] == pytest.approx(loss, rel=1e-5)
        assert metrics[f"eval_layer_{layer}_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert metrics[f"eval_layer_{layer}_agreement"] == pytest.approx((agree[layer - 1] / count).item(), rel=1e-5)
    assert metrics["eval_perplexity"] == metrics[f"eval_layer_{NUM_LAYERS}_perplexity"]
    assert 1 <= metrics["eval_minimal_depth"] <= NUM_LAYERS
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card
    assert f"| 1 | {metrics['eval_layer_1_loss']:.4f}" in card
    agreement = [metrics[f"eval_layer_{layer}_agreement"] for layer in range(1, NUM_LAYERS + 1)]
    suggestion = suggest_assistant_early_exit(agreement)
    assert ("assistant_early_exit=" in card) == (suggestion is not None)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"distillation_weight": 0.5}, "`distillation_weight`"),
        ({"distillation_weight": 0.0}, "`distillation_weight`"),
        ({"distillation_temperature": 2.0}, "`distillation_temperature`"),
        ({"classifier_update": "all"}, "`classifier_update`"),
        ({"classifier_lr_ratio": 10.0}, "`classifier_lr_ratio`"),
        ({"recipe": "paper"}, "`recipe`, `classifier_update`, `distillation_weight`, `classifier_lr_ratio`"),
    ],
)
def test_trainer_refuses_classifier_options_for_a_language_model(tmp_path, options, named):
    args = AlignedTrainingArguments(output_dir=str(tmp_path), report_to="none", **options)
    with pytest.raises(ValueError, match=f"^{named} configure a classification head's training and do not apply"):
        AlignedTrainer(tiny_causal_lm("gpt2"), args)


def test_pickled_model_round_trips():
    model = tiny_causal_lm("gpt2", layer_weights="uniform")
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model) and copy.alignment == model.alignment
    input_ids = tokens()
    with torch.no_grad():
        assert torch.equal(copy(input_ids).logits, model(input_ids).logits)


def test_lora_adapters_train_with_the_aligned_loss_and_merge_into_a_plain_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    input_ids = tokens()
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.layer_losses.shape == (NUM_LAYERS,)
    out.loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# Non-default logit factors, so a head that ignored them would give other logits.
HEAD_FACTORS = {"granite": {"logits_scaling": 4.0}, "cohere": {"logit_scale": 0.5}}


def tiny_family_config(model_type: str):
    """A tiny config of any family in CAUSAL_LM_HEADS (2 blocks, hidden 32), with non-default logit factors."""
    if model_type in DECODER_FAMILIES:
        return tiny_base_config(model_type, num_layers=2)
    sizes = {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    sizes |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0}
    sizes |= {"bos_token_id": 1, "eos_token_id": 2}
    config = AutoConfig.for_model(model_type, **sizes, **HEAD_FACTORS.get(model_type, {}))
    if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2 and 3: a cap that bites
        config.final_logit_softcapping = 0.5
    return config


@pytest.mark.parametrize("model_type", sorted(CAUSAL_LM_HEADS))
def test_every_accepted_family_gives_its_own_logits_and_last_layer_loss(model_type):
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(tiny_family_config(model_type), layer_weights="last").eval()
    input_ids = tokens(length=7)
    plain_forward = type(model).__mro__[2].forward  # the family's own causal-LM forward, on the same weights
    with torch.no_grad():
        aligned = model(input_ids=input_ids, labels=input_ids, output_layer_agreement=True)
        own = plain_forward(model, input_ids=input_ids, labels=input_ids)
        torch.testing.assert_close(aligned.logits, model(input_ids).logits)
        torch.testing.assert_close(aligned.logits, own.logits)
        torch.testing.assert_close(aligned.loss, own.loss)
        # The earlier block is read through the same head: its loss equals the family's own with that many blocks.
        model.config.num_hidden_layers = 1
        first = plain_forward(model, input_ids=input_ids, labels=input_ids) if model_type != "gpt2" else None
        model.config.num_hidden_layers = 2
    if first is not None:
        torch.testing.assert_close(aligned.layer_losses[0], first.loss)


def test_families_whose_head_is_not_verified_are_refused_with_a_way_out():
    config = AutoConfig.for_model("olmo2", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=r"not verified how model type 'olmo2'.*CAUSAL_LM_HEADS\['olmo2'\]"):
        AlignedForCausalLM.from_config(config)
