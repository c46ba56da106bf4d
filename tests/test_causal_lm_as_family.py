"""An aligned causal LM behaves as its family's own class wherever transformers users rely on it: the forward
signature (positional binding, Trainer's kept columns, generation's `position_ids` and `logits_to_keep`), and
batched left-padded or sampled generation equal to the plain class with the same weights."""

from __future__ import annotations

import inspect

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from hf_aligned import CAUSAL_LM_HEADS, AlignedForCausalLM
from hf_aligned.compat import causal_lm_class

from .test_causal_lm import tiny_family_config
from .testing_utils import VOCAB_SIZE


def aligned_and_plain(model_type: str):
    """An aligned model of a family and the family's own class with the same weights, both in eval mode."""
    torch.manual_seed(0)
    config = tiny_family_config(model_type)
    model = AlignedForCausalLM.from_config(config).eval()
    plain = causal_lm_class(config)(config).eval()
    plain.load_state_dict(model.state_dict())
    return model, plain


def left_padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, VOCAB_SIZE, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    attention_mask[1, :2] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("model_type", sorted(CAUSAL_LM_HEADS))
def test_forward_signature_is_the_familys_own(model_type):
    model, plain = aligned_and_plain(model_type)
    assert inspect.signature(model.forward) == inspect.signature(plain.forward)
    assert inspect.signature(type(model).forward) == inspect.signature(type(plain).forward)


@pytest.mark.parametrize("model_type", sorted(CAUSAL_LM_HEADS))
def test_batched_left_padded_and_sampled_generation_equal_the_plain_class(model_type):
    model, plain = aligned_and_plain(model_type)
    batch = left_padded_batch()
    settings = {"max_new_tokens": 8, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        greedy = plain.generate(**batch, do_sample=False, output_scores=True, return_dict_in_generate=True, **settings)
        ours = model.generate(**batch, do_sample=False, output_scores=True, return_dict_in_generate=True, **settings)
        assert torch.equal(ours.sequences, greedy.sequences)
        for got, wanted in zip(ours.scores, greedy.scores):
            torch.testing.assert_close(got, wanted)
        torch.manual_seed(11)
        sampled = plain.generate(**batch, do_sample=True, top_k=0, **settings)
        torch.manual_seed(11)
        assert torch.equal(model.generate(**batch, do_sample=True, top_k=0, **settings), sampled)
        # Assisted generation takes one prompt at a time: a left-padded one gives plain greedy output too.
        one = {name: value[:1] for name, value in batch.items()}
        expected = plain.generate(**one, do_sample=False, **settings)
        drafted = model.generate(**one, do_sample=False, assistant_early_exit=1, **settings)
        assert torch.equal(drafted, expected)
        if model_type == "gpt2":  # transformers' own early exit fails for GPT-2 (its forward runs every block)
            return
        # Sampled with a seed, the self-speculative draft gives what transformers' own early exit gives on the plain
        # class (the same draft: the first block through the final norm and LM head).
        torch.manual_seed(7)
        expected = plain.generate(**one, do_sample=True, top_k=0, assistant_early_exit=1, **settings)
        torch.manual_seed(7)
        assert torch.equal(
            model.generate(**one, do_sample=True, top_k=0, assistant_early_exit=1, **settings), expected
        )


def test_generation_keeps_only_the_last_logits_of_the_prompt():
    model, _ = aligned_and_plain("llama")
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        model.generate(**left_padded_batch(), max_new_tokens=1, do_sample=False, pad_token_id=0)
    handle.remove()
    assert seen == [torch.Size([3, 1, VOCAB_SIZE])]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_positional_arguments_bind_as_in_the_family(model_type):
    model, plain = aligned_and_plain(model_type)
    batch = left_padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    names = list(inspect.signature(plain.forward).parameters)
    values = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    args = []
    for name in names:  # the family's leading positional parameters, as the family orders them
        if name not in values and name != "cache":
            break
        args.append(values.get(name))
    with torch.no_grad():
        torch.testing.assert_close(model(*args).logits, plain(*args).logits)
        assert model(*args).loss is None


def test_trainer_keeps_the_columns_the_familys_forward_names(tmp_path):
    model, _ = aligned_and_plain("llama")
    ids = torch.randint(3, VOCAB_SIZE, (4, 8), generator=torch.Generator().manual_seed(2)).tolist()
    packed = [list(range(4)) * 2 for _ in ids]  # two packed documents per row
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids, "position_ids": packed, "text": ["x"] * 4})
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model, args, eval_dataset=dataset)
    kept = trainer._remove_unused_columns(dataset)
    assert kept.column_names == ["input_ids", "labels", "position_ids"]
    with torch.no_grad():
        tensors = {name: torch.tensor(kept[name]) for name in kept.column_names}
        expected = model(**tensors).loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_generating_in_train_mode_warns_and_eval_mode_gives_identical_output():
    config = tiny_family_config("gpt2")
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.5
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(config)
    assert model.training  # as transformers' from_config leaves it
    prompt = torch.tensor([[5, 9, 2]])
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    logger = logging.get_logger("hf_aligned.modeling_causal_lm")
    with CaptureLogger(logger) as captured:
        model.generate(prompt, **settings)
    assert "generate runs in train mode: dropout is active" in captured.out
    model.eval()
    plain = model.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, assistant_early_exit=1, **settings), plain)


def test_generating_in_train_mode_warns_only_when_something_drops():
    prompt = torch.tensor([[5, 9, 2]])
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    logger = logging.get_logger("hf_aligned.modeling_causal_lm")
    config = tiny_family_config("llama")
    assert config.attention_dropout == 0.0  # Llama's defaults drop nothing
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        AlignedForCausalLM.from_config(config).generate(prompt, **settings)
    assert "train mode" not in captured.out
    config.attention_dropout = 0.1  # a functional dropout inside attention, no dropout module
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        AlignedForCausalLM.from_config(config).generate(prompt, **settings)
    assert "generate runs in train mode: dropout is active" in captured.out
