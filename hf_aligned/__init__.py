"""hf_aligned: layer-aligned training and single-classifier multi-exit inference for Hugging Face Transformers.

Importing the package registers the `"aligned"` model type with transformers' Auto classes, so aligned checkpoints
load through `AutoConfig` and `AutoModelForSequenceClassification` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .callbacks import RepresentationDynamicsCallback
from .configuration_aligned import AlignedConfig, resolve_layer_weights
from .modeling_aligned import (
    AlignedForSequenceClassification,
    AlignedPreTrainedModel,
    AlignedSequenceClassifierOutput,
    pool_hidden_states,
)
from .plotting import plot_dynamics, plot_layer_accuracy, plot_similarity_heatmaps
from .probes import ProbeResults, classifier_layer_accuracy, linear_probe_accuracy
from .similarity import (
    MinibatchCKA,
    cka_matrix,
    cosine_similarity_matrix,
    iter_layer_representations,
    layer_representations,
    layerwise_cka,
    linear_cka,
    minibatch_cka,
    off_diagonal_mean,
    sample_cosine,
    similarity_agreement,
    similarity_by_distance,
    unbiased_hsic_matrix,
)

__version__ = "0.1.0.dev0"

AutoConfig.register(AlignedConfig.model_type, AlignedConfig, exist_ok=True)
AutoModelForSequenceClassification.register(AlignedConfig, AlignedForSequenceClassification, exist_ok=True)

__all__ = [
    "AlignedConfig",
    "AlignedForSequenceClassification",
    "AlignedPreTrainedModel",
    "AlignedSequenceClassifierOutput",
    "MinibatchCKA",
    "ProbeResults",
    "RepresentationDynamicsCallback",
    "cka_matrix",
    "classifier_layer_accuracy",
    "cosine_similarity_matrix",
    "iter_layer_representations",
    "layer_representations",
    "layerwise_cka",
    "linear_cka",
    "linear_probe_accuracy",
    "minibatch_cka",
    "off_diagonal_mean",
    "plot_dynamics",
    "plot_layer_accuracy",
    "plot_similarity_heatmaps",
    "pool_hidden_states",
    "resolve_layer_weights",
    "sample_cosine",
    "similarity_agreement",
    "similarity_by_distance",
    "unbiased_hsic_matrix",
]
