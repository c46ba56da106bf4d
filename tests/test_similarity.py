"""COS, CKA (exact and minibatch), their agreement and reading representations, checked against numpy."""

from __future__ import annotations

import copy
import logging
import sys

import datasets
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoModel

from hf_aligned import (
    AlignedConfig,
    AlignedForSequenceClassification,
    MinibatchCKA,
    cka_matrix,
    cosine_similarity_matrix,
    iter_layer_representations,
    layer_representations,
    layerwise_cka,
    linear_cka,
    minibatch_cka,
    off_diagonal_mean,
    plot_layer_accuracy,
    plot_similarity_heatmaps,
    pool_hidden_states,
    sample_cosine,
    similarity_agreement,
    similarity_by_distance,
    unbiased_hsic_matrix,
)
from hf_aligned.backbones import find_layout

from .testing_utils import DECODER_FAMILIES, FAMILIES, tiny_base_config, tiny_inputs, tiny_model

# ----------------------------------------------------------------------------------------------------------------------
# Independent numpy references
# ----------------------------------------------------------------------------------------------------------------------


def numpy_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(x, y)])


def numpy_cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from centered Gram matrices, HSIC = tr(K H L H) (Kornblith et al., 2019), a different formula from ours."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_))


def numpy_unbiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC through U-centered Gram matrices (Székely & Rizzo, 2014), equivalent to Song et al. (2012)."""

    def u_center(gram: np.ndarray) -> np.ndarray:
        n = len(gram)
        gram = gram.copy()
        np.fill_diagonal(gram, 0.0)
        centered = (
            gram
            - gram.sum(axis=0, keepdims=True) / (n - 2)
            - gram.sum(axis=1, keepdims=True) / (n - 2)
            + gram.sum() / ((n - 1) * (n - 2))
        )
        np.fill_diagonal(centered, 0.0)
        return centered

    n = len(x)
    return float((u_center(x @ x.T) * u_center(y @ y.T)).sum() / (n * (n - 3)))


def residual_stream(num_layers: int, num_samples: int, dim: int, seed: int = 0, step: float = 0.7) -> np.ndarray:
    """Synthetic `[K, N, D]` representations that drift layer by layer, so similarity falls with layer distance."""
    rng = np.random.default_rng(seed)
    layers = [rng.normal(size=(num_samples, dim)) + 0.5]
    for _ in range(num_layers - 1):
        layers.append(layers[-1] + step * rng.normal(size=(num_samples, dim)))
    return np.stack(layers)


# ----------------------------------------------------------------------------------------------------------------------
# COS
# ----------------------------------------------------------------------------------------------------------------------


def test_cosine_similarity_matrix_matches_numpy():
    reps = residual_stream(5, 70, 12)
    expected = np.array([[numpy_cos(a, b).mean() for b in reps] for a in reps])
    # A chunk size that does not divide N exercises the streamed accumulation.
    result = cosine_similarity_matrix(torch.tensor(reps, dtype=torch.float32), chunk_size=16)
    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(cosine_similarity_matrix(reps).numpy(), expected, atol=1e-12)


def test_sample_cosine_matches_numpy_and_the_matrix():
    reps = residual_stream(4, 30, 8)
    reps[1, 3] = 0.0
    per_sample = sample_cosine(reps, 0, 2)
    assert per_sample.shape == (30,)
    np.testing.assert_allclose(per_sample.numpy(), numpy_cos(reps[0], reps[2]), atol=1e-12)
    assert sample_cosine(reps, 1, 2)[3] == 0.0  # a zero vector has cosine 0
    assert cosine_similarity_matrix(reps)[0, 2] == pytest.approx(float(per_sample.mean()), abs=1e-12)
    assert sample_cosine(reps, -1, 3).numpy() == pytest.approx(np.ones(30))


def test_cosine_needs_equal_widths():
    with pytest.raises(ValueError, match="equal width"):
        cosine_similarity_matrix([torch.randn(5, 3), torch.randn(5, 4)])


# ----------------------------------------------------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "dim"), [(60, 10), (12, 40)], ids=["feature-space", "gram-space"])
def test_cka_matrix_matches_numpy(num_samples, dim):
    reps = residual_stream(4, num_samples, dim)
    expected = np.array([[numpy_cka_gram(a, b) for b in reps] for a in reps])
    result = cka_matrix(torch.tensor(reps))
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(result.numpy(), result.numpy().T, atol=1e-15)
    assert linear_cka(reps[0], reps[3]) == pytest.approx(expected[0, 3], abs=1e-6)


@pytest.mark.parametrize(("num_samples", "dim"), [(300, 10), (12, 40)], ids=["feature-space", "gram-space"])
def test_cka_of_float32_representations(num_samples, dim, monkeypatch):
    reps = residual_stream(4, num_samples, dim, seed=12)
    expected = np.array([[numpy_cka_gram(a, b) for b in reps] for a in reps])
    single = torch.tensor(reps, dtype=torch.float32)
    # float32 products over chunks of 64 samples, partial sums in float64.
    np.testing.assert_allclose(cka_matrix(single, chunk_size=64).numpy(), expected, atol=1e-6)
    # Where float32 matmuls may run as TF32 / bfloat16, the products are float64 instead.
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert torch.equal(cka_matrix(single, chunk_size=64), cka_matrix(single.double()))


def test_cka_compares_layers_of_different_widths():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 7)), rng.normal(size=(50, 19))
    result = cka_matrix([torch.tensor(x), torch.tensor(y)])
    assert result[0, 1] == pytest.approx(numpy_cka_gram(x, y), abs=1e-6)


def test_cka_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 16))
    y = np.tanh(x @ rng.normal(size=(16, 16))) + 0.3 * rng.normal(size=(80, 16))
    reference = linear_cka(x, y)
    orthogonal, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, y @ orthogonal) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    # Not invariant to an anisotropic scaling: the test above could fail.
    scale = np.linspace(0.1, 10.0, 16)
    assert abs(linear_cka(x * scale, y) - reference) > 1e-3


def test_cka_of_a_constant_layer_is_nan():
    rng = np.random.default_rng(3)
    constant = np.tile(rng.normal(size=(1, 6)), (20, 1))
    result = cka_matrix([torch.tensor(constant), torch.tensor(rng.normal(size=(20, 6)))])
    assert torch.isnan(result[0]).all() and torch.isnan(result[:, 0]).all()
    assert result[1, 1] == pytest.approx(1.0)


def test_layerwise_cka_pairs_layers():
    first = residual_stream(3, 40, 6, seed=4)
    second = first + 0.5 * np.random.default_rng(5).normal(size=first.shape)
    expected = [numpy_cka_gram(a, b) for a, b in zip(first, second)]
    assert layerwise_cka(first, second) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="same layers of the same samples"):
        layerwise_cka(first, second[:2])


# ----------------------------------------------------------------------------------------------------------------------
# Minibatch CKA
# ----------------------------------------------------------------------------------------------------------------------


def test_unbiased_hsic_matches_numpy():
    reps = residual_stream(3, 20, 5, seed=6)
    expected = np.array([[numpy_unbiased_hsic(a, b) for b in reps] for a in reps])
    np.testing.assert_allclose(unbiased_hsic_matrix(torch.tensor(reps)).numpy(), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="at least 4 samples"):
        unbiased_hsic_matrix(reps[:, :3])


def test_minibatch_cka_is_the_ratio_of_mean_hsic():
    reps = residual_stream(3, 48, 5, seed=7)
    batches = [reps[:, start : start + 16] for start in range(0, 48, 16)]
    mean_hsic = np.mean([[[numpy_unbiased_hsic(a, b) for b in batch] for a in batch] for batch in batches], axis=0)
    expected = mean_hsic / np.sqrt(np.outer(np.diag(mean_hsic), np.diag(mean_hsic)))
    np.testing.assert_allclose(minibatch_cka(torch.tensor(batch) for batch in batches).numpy(), expected, atol=1e-6)


@pytest.fixture
def one_thread():
    """Hundreds of tiny products: on a busy machine, waking worker threads would cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_minibatch_cka_approaches_the_exact_value_as_batches_grow(one_thread):
    rng = np.random.default_rng(0)
    first = rng.normal(size=(4096, 4))
    second = np.tanh(first @ rng.normal(size=(4, 4)) / 2.0) + 0.5 * rng.normal(size=(4096, 4))
    reps = torch.tensor(np.stack([first, second]))
    exact = float(cka_matrix(reps)[0, 1])
    errors = []
    for batch_size in (16, 128, 1024, 4096):
        # Mean error over a few orders of the samples, so the trend is not one draw's luck.
        error = 0.0
        for seed in range(3):
            shuffled = reps[:, torch.randperm(4096, generator=torch.Generator().manual_seed(seed))]
            accumulator = MinibatchCKA()
            for start in range(0, 4096, batch_size):
                accumulator.update(shuffled[:, start : start + batch_size])
            error += abs(float(accumulator.compute()[0, 1]) - exact) / 3
        errors.append(error)
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3


def test_minibatch_cka_skips_tiny_batches_and_checks_layers(caplog):
    reps = torch.tensor(residual_stream(2, 20, 4, seed=9))
    accumulator = MinibatchCKA()
    with pytest.raises(ValueError, match="before any batch"):
        accumulator.compute()
    accumulator.update(reps[:, :16])
    with caplog.at_level(logging.WARNING, logger="hf_aligned.similarity"):
        accumulator.update(reps[:, 16:19])
    assert "at least 4" in caplog.text
    assert accumulator.num_batches == 1
    with pytest.raises(ValueError, match="holds 2 layers but the batch has 3"):
        accumulator.update(torch.tensor(residual_stream(3, 8, 4)))
    labelled = minibatch_cka([(reps[:, :16], torch.zeros(16))])
    torch.testing.assert_close(labelled, accumulator.compute())


# ----------------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------------


def test_similarity_agreement_matches_scipy():
    reps = residual_stream(6, 50, 8, seed=10)
    cos, cka = cosine_similarity_matrix(reps), cka_matrix(reps)
    rows, cols = np.triu_indices(6, k=1)
    agreement = similarity_agreement(cos, cka)
    assert agreement["num_pairs"] == 15
    assert agreement["spearman"] == pytest.approx(stats.spearmanr(cos[rows, cols], cka[rows, cols])[0], abs=1e-12)
    assert agreement["pearson"] == pytest.approx(stats.pearsonr(cos[rows, cols], cka[rows, cols])[0], abs=1e-12)


def test_similarity_agreement_handles_ties_and_nan():
    first = np.array([[1.0, 0.5, 0.5, 0.2], [0.5, 1.0, 0.5, np.nan], [0.5, 0.5, 1.0, 0.1], [0.2, np.nan, 0.1, 1.0]])
    second = np.array([[1.0, 0.9, 0.7, 0.3], [0.9, 1.0, 0.8, 0.4], [0.7, 0.8, 1.0, 0.2], [0.3, 0.4, 0.2, 1.0]])
    kept_first, kept_second = [0.5, 0.5, 0.2, 0.5, 0.1], [0.9, 0.7, 0.3, 0.8, 0.2]
    agreement = similarity_agreement(first, second)
    assert agreement["num_pairs"] == 5
    assert agreement["spearman"] == pytest.approx(stats.spearmanr(kept_first, kept_second)[0], abs=1e-12)
    assert agreement["pearson"] == pytest.approx(stats.pearsonr(kept_first, kept_second)[0], abs=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        similarity_agreement(first, second[:3, :3])
    with pytest.raises(ValueError, match="square"):
        similarity_agreement(first[:2], second[:2])


def test_off_diagonal_mean_and_distance_profile():
    matrix = np.array([[1.0, 0.8, 0.4], [0.8, 1.0, 0.6], [0.4, 0.6, 1.0]])
    assert off_diagonal_mean(matrix) == pytest.approx(0.6)
    assert similarity_by_distance(matrix) == pytest.approx([0.7, 0.4])
    reps = residual_stream(5, 200, 16, seed=11)
    profile = similarity_by_distance(cka_matrix(reps))
    assert profile == sorted(profile, reverse=True)


def test_representation_validation():
    with pytest.raises(ValueError, match=r"\[num_layers, num_samples, dim\]"):
        cka_matrix(torch.randn(4, 5))
    with pytest.raises(ValueError, match="same samples"):
        cka_matrix([torch.randn(5, 3), torch.randn(6, 3)])
    with pytest.raises(TypeError, match="floating point"):
        cka_matrix(torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no layers"):
        cka_matrix([])


# ----------------------------------------------------------------------------------------------------------------------
# Reading representations from a model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_representations_match_output_hidden_states(family):
    """Pooled `output_hidden_states` of the plain base model equal ours; decoders norm their last entry."""
    torch.manual_seed(0)
    base = AutoModel.from_config(tiny_base_config(family)).eval()
    config = AlignedConfig(base_config=base.config, num_labels=3)
    model = AlignedForSequenceClassification(config, base_model=copy.deepcopy(base)).eval()
    inputs = tiny_inputs(family, batch_size=5, padding_side="left" if family in DECODER_FAMILIES else "right")
    reps = layer_representations(model, [inputs])
    base_inputs = dict(inputs)
    if family in DECODER_FAMILIES:
        # The aligned model gives left-padded decoders the positions of the unpadded sequence, as `generate` does.
        base_inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    hidden_states = base(**base_inputs, output_hidden_states=True).hidden_states
    expected = torch.stack(
        [pool_hidden_states(h, inputs.get("attention_mask"), config.pooling) for h in hidden_states]
    )
    assert reps.shape == (model.num_layers + 1, 5, 32)
    if family in DECODER_FAMILIES:
        # GPT-2 / Llama return the last entry after the final norm; ours is the last block's own output.
        torch.testing.assert_close(reps[:-1], expected[:-1], rtol=0, atol=1e-6)
        final_norm = base.get_submodule(find_layout(base).final_norm)
        torch.testing.assert_close(final_norm(reps[-1]), expected[-1], rtol=0, atol=1e-5)
        assert not torch.allclose(reps[-1], expected[-1], atol=1e-2)
    else:
        torch.testing.assert_close(reps, expected, rtol=0, atol=1e-6)


def _ragged_dataset(num_samples: int = 11, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (num_samples,), generator=generator).tolist()
    ids = [torch.randint(3, 99, (length,), generator=generator).tolist() for length in lengths]
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * length for length in lengths],
            "label": [index % 3 for index in range(num_samples)],
            "text": [f"sample {index}" for index in range(num_samples)],
        }
    )


def _pad(samples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(sample["input_ids"]) for sample in samples)
    batch = {"input_ids": [], "attention_mask": []}
    for sample in samples:
        padding = width - len(sample["input_ids"])
        batch["input_ids"].append(sample["input_ids"] + [0] * padding)
        batch["attention_mask"].append(sample["attention_mask"] + [0] * padding)
    batch = {key: torch.tensor(value) for key, value in batch.items()}
    batch["labels"] = torch.tensor([sample["label"] for sample in samples])
    return batch


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_streaming_does_not_depend_on_batching_or_padding(pooling):
    model = tiny_model("bert", pooling=pooling)
    dataset = _ragged_dataset()
    one_by_one, labels = layer_representations(model, dataset, batch_size=1, collate_fn=_pad, return_labels=True)
    batched = layer_representations(model, dataset, batch_size=4, collate_fn=_pad)
    assert one_by_one.shape == (5, 11, 32) and one_by_one.dtype == torch.float32
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    assert labels.tolist() == dataset["label"]
    loader = torch.utils.data.DataLoader(dataset.remove_columns("text"), batch_size=3, collate_fn=_pad)
    torch.testing.assert_close(layer_representations(model, loader), one_by_one, rtol=0, atol=1e-5)
    streamed = list(iter_layer_representations(model, loader))
    assert [states.shape[1] for states, _ in streamed] == [3, 3, 3, 2]


def test_layer_representations_options():
    model = tiny_model("bert").train()
    dataset = _ragged_dataset()
    reps = layer_representations(model, dataset, batch_size=4, collate_fn=_pad, max_samples=6)
    assert reps.shape[1] == 6
    assert model.training  # the mode is restored
    batches = [_pad([dataset[i] for i in range(4)]), _pad([dataset[i] for i in range(4, 8)])]
    assert layer_representations(model, batches, max_samples=5).shape[1] == 5
    mean = layer_representations(model, batches, pooling="mean")
    cls = layer_representations(model, batches)
    inputs = {key: value for key, value in batches[0].items() if key != "labels"}
    torch.testing.assert_close(cls[:, :4], model.eval().pooled_layer_states(**inputs), rtol=0, atol=1e-6)
    assert not torch.allclose(mean, cls)
    unlabelled = [{key: value for key, value in batch.items() if key != "labels"} for batch in batches]
    assert layer_representations(model, unlabelled, return_labels=True)[1] is None


def test_layer_representations_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="DataCollatorWithPadding"):
        layer_representations(model, _ragged_dataset())
    with pytest.raises(TypeError, match="no `pooled_layer_states`"):
        layer_representations(torch.nn.Linear(2, 2), [{"input_ids": torch.ones(1, 2)}])
    with pytest.raises(ValueError, match="none of the model's inputs"):
        layer_representations(model, [{"text": ["a"]}])
    with pytest.raises(TypeError, match="dict batches"):
        layer_representations(model, [torch.ones(2, 3)])
    with pytest.raises(TypeError, match="iterable of dict batches"):
        layer_representations(model, 3)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        layer_representations(model, _ragged_dataset(), batch_size=0)
    with pytest.raises(ValueError, match="no samples"):
        layer_representations(model, [])


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def test_plot_similarity_heatmaps(tmp_path):
    reps = residual_stream(4, 30, 6)
    cos, cka = cosine_similarity_matrix(reps), cka_matrix(reps)
    figure = plot_similarity_heatmaps({"COS": cos, "CKA": cka}, tmp_path / "one_row.png")
    panels = [axis for axis in figure.axes if axis.get_images()]
    assert [axis.get_title() for axis in panels] == ["COS", "CKA"]
    np.testing.assert_allclose(panels[1].get_images()[0].get_array(), cka.numpy())
    assert (tmp_path / "one_row.png").stat().st_size > 0
    grid = plot_similarity_heatmaps({"standard": {"COS": cos, "CKA": cka}, "aligned": {"COS": cos}}, first_layer=1)
    titles = [axis.get_title() for axis in grid.axes if axis.get_images()]
    assert titles == ["standard: COS", "standard: CKA", "aligned: COS"]
    with pytest.raises(ValueError, match="mixes matrices and mappings"):
        plot_similarity_heatmaps({"COS": cos, "aligned": {"CKA": cka}})
    with pytest.raises(ValueError, match="square"):
        plot_similarity_heatmaps({"COS": cos[:2]})


def test_plot_layer_accuracy(tmp_path, monkeypatch):
    curves = {"standard": [0.5, 0.6, 0.9], "aligned": [0.8, 0.85, 0.9]}
    figure = plot_layer_accuracy(curves, tmp_path / "accuracy.png", chance=0.5)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["standard", "aligned", "chance"]
    assert lines[1].get_xdata().tolist() == [1, 2, 3] and lines[1].get_ydata().tolist() == curves["aligned"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"hf-aligned\[plots\]"):
        plot_layer_accuracy(curves)
