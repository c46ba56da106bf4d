"""One description of alignment for both models: `AlignmentSettings`, its validation and its keywords."""

from __future__ import annotations

import json

import pytest

from hf_aligned import AlignedConfig, AlignedForCausalLM, AlignedForSequenceClassification, AlignmentSettings
from hf_aligned.alignment import ALIGNMENT_KEYWORDS, CAUSAL_LM, CLASSIFICATION, KIND_FIELDS, model_kind

from .testing_utils import NUM_LAYERS, tiny_base_config, tiny_model


def test_both_models_carry_the_same_settings_class_read_and_written_the_same_way(tmp_path):
    classifier = tiny_model("bert", layer_weights="uniform", aligned_layers=[4, 2])
    causal = AlignedForCausalLM.from_config(tiny_base_config("llama"), layer_weights="uniform", aligned_layers=[4, 2])
    for model, kind in ((classifier, CLASSIFICATION), (causal, CAUSAL_LM)):
        assert type(model.alignment) is AlignmentSettings and model_kind(model.config) == kind
        assert model.alignment.layer_weights == "uniform" and model.alignment.aligned_layers == [2, 4]
        assert model.alignment.validate(NUM_LAYERS) == [0.0, 0.5, 0.0, 0.5]
        model.save_pretrained(tmp_path / kind)
    saved = {kind: json.loads((tmp_path / kind / "config.json").read_text()) for kind in (CLASSIFICATION, CAUSAL_LM)}
    # The classifier's config carries its settings as its own fields; the causal LM's plain config as a dict.
    recorded = {
        CLASSIFICATION: {name: saved[CLASSIFICATION][name] for name in KIND_FIELDS[CLASSIFICATION]},
        CAUSAL_LM: saved[CAUSAL_LM]["aligned_training"],
    }
    for kind, values in recorded.items():
        assert AlignmentSettings.from_dict(values, kind) == AlignmentSettings.from_dict(
            AlignmentSettings(**values).to_dict(kind), kind
        )
        assert values["layer_weights"] == "uniform" and values["aligned_layers"] == [2, 4]
    reloaded = AlignedForSequenceClassification.from_pretrained(tmp_path / CLASSIFICATION)
    assert reloaded.alignment == classifier.alignment
    assert AlignedForCausalLM.from_pretrained(tmp_path / CAUSAL_LM).alignment == causal.alignment


def test_one_validation_refuses_the_same_mistakes_for_both_models_by_name():
    classifier = tiny_model("bert")
    causal = AlignedForCausalLM.from_config(tiny_base_config("llama"))
    for model in (classifier, causal):
        before = model.alignment
        with pytest.raises(TypeError, match=r"unknown settings \['layer_weight'\]"):
            model.configure_alignment(layer_weight="linear")
        with pytest.raises(ValueError, match=r"`aligned_layers` holds 9; entries are 1-based block indices"):
            model.configure_alignment(aligned_layers=[9])
        with pytest.raises(ValueError, match="`layer_weights` has 2 entries but the model has 4 layers"):
            model.configure_alignment(layer_weights=[1.0, 2.0])
        assert model.alignment == before  # a refused change changes nothing
    with pytest.raises(ValueError, match=r"`classifier_update` configure a classification head's training"):
        causal.configure_alignment(classifier_update="last")
    with pytest.raises(ValueError, match=r"`layers_per_step` configure a language model's loss"):
        classifier.configure_alignment(layers_per_step=2)
    with pytest.raises(ValueError, match=r"`distillation_weight=2.0` must lie in \[0, 1\]"):
        AlignedConfig(base_config=tiny_base_config("bert"), distillation_weight=2.0)
    with pytest.raises(ValueError, match=r"`aligned_training` has unknown keys \['classifier_update'\]"):
        AlignmentSettings.from_dict({"classifier_update": "all"}, CAUSAL_LM)
    assert set(ALIGNMENT_KEYWORDS) == set(KIND_FIELDS[CLASSIFICATION]) | set(KIND_FIELDS[CAUSAL_LM])


def test_configure_alignment_rewrites_the_config_after_validating():
    classifier = tiny_model("bert")
    settings = classifier.configure_alignment(layer_weights="last", distillation_weight=0.5)
    assert classifier.config.layer_weights == "last" and classifier.config.distillation_weight == 0.5
    assert settings == classifier.alignment and classifier.config.resolved_layer_weights == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="`classifier_sharing='per_layer'` cannot change on a built model"):
        classifier.configure_alignment(classifier_sharing="per_layer")
