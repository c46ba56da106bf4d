"""Pooling in half precision: token positions and lengths are integers, exact at any sequence length."""

import copy

import pytest
import torch
from transformers import AutoModel

from hf_aligned import AlignedConfig, AlignedForSequenceClassification
from hf_aligned.modeling_aligned import pool_hidden_states
from tests.testing_utils import reference_layer_logits, tiny_base_config

HALF_PRECISION_CASES = [(torch.bfloat16, 300), (torch.float16, 300), (torch.float16, 2100)]


def padded_mask(lengths, seq_len, padding_side):
    positions = torch.arange(seq_len).expand(len(lengths), -1)
    lengths = torch.tensor(lengths)[:, None]
    return (positions < lengths if padding_side == "right" else positions >= seq_len - lengths).long()


@pytest.mark.parametrize(("dtype", "seq_len"), HALF_PRECISION_CASES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_pooling_picks_the_last_real_token_beyond_the_exact_integers_of_the_dtype(dtype, seq_len, padding_side):
    # Lengths just above 256 (bf16) and 2048 (fp16) are where float positions round onto a neighbour.
    lengths = [seq_len, seq_len - 1, 257, 259, 2049 if seq_len > 2049 else seq_len - 3]
    mask = padded_mask(lengths, seq_len, padding_side)
    hidden = torch.randn(len(lengths), seq_len, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    pooled = pool_hidden_states(hidden, mask, "last")
    last = [seq_len - 1 if padding_side == "left" else length - 1 for length in lengths]
    assert torch.equal(pooled, torch.stack([hidden[row, index] for row, index in enumerate(last)]))


@pytest.mark.parametrize(("dtype", "seq_len"), HALF_PRECISION_CASES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mean_pooling_in_half_precision_matches_a_float64_mean(dtype, seq_len, padding_side):
    lengths = [seq_len, 257, 259]
    mask = padded_mask(lengths, seq_len, padding_side)
    hidden = torch.randn(len(lengths), seq_len, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    pooled = pool_hidden_states(hidden, mask, "mean")
    assert pooled.dtype == dtype
    expected = torch.stack([hidden[row, mask[row].bool()].double().mean(dim=0) for row in range(len(lengths))])
    # One rounding to the half-precision result: within one unit in the last place of the float64 mean.
    torch.testing.assert_close(pooled.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-3)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_bf16_decoder_classifies_the_last_real_token_of_long_sequences(padding_side):
    config = tiny_base_config("llama", num_layers=2)
    torch.manual_seed(0)
    plain = AutoModel.from_config(config).to(torch.bfloat16).eval()
    model = AlignedForSequenceClassification(
        AlignedConfig(base_config=config, num_labels=3), base_model=copy.deepcopy(plain)
    ).to(torch.bfloat16)
    model.eval()
    seq_len = 300
    attention_mask = padded_mask([300, 257, 270], seq_len, padding_side)
    input_ids = torch.randint(3, config.vocab_size, attention_mask.shape, generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}
    with torch.no_grad():
        layer_logits = model(**inputs, output_layer_logits=True).layer_logits
    torch.testing.assert_close(layer_logits, reference_layer_logits(plain, model, inputs, "llama"))
