"""hf_aligned: layer-aligned training and single-classifier multi-exit inference for Hugging Face Transformers.

Importing the package registers the `"aligned"` model type with transformers' Auto classes, so aligned checkpoints
load through `AutoConfig` and `AutoModelForSequenceClassification` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .configuration_aligned import AlignedConfig, resolve_layer_weights
from .metrics import LayerwiseMetrics, format_layer_table, layer_values, minimal_depth
from .modeling_aligned import (
    AlignedForSequenceClassification,
    AlignedPreTrainedModel,
    AlignedSequenceClassifierOutput,
    pool_hidden_states,
)
from .trainer import AlignedTrainer
from .training_args import AlignedTrainingArguments

__version__ = "0.1.0.dev0"

AutoConfig.register(AlignedConfig.model_type, AlignedConfig, exist_ok=True)
AutoModelForSequenceClassification.register(AlignedConfig, AlignedForSequenceClassification, exist_ok=True)

__all__ = [
    "AlignedConfig",
    "AlignedForSequenceClassification",
    "AlignedPreTrainedModel",
    "AlignedSequenceClassifierOutput",
    "AlignedTrainer",
    "AlignedTrainingArguments",
    "LayerwiseMetrics",
    "format_layer_table",
    "layer_values",
    "minimal_depth",
    "pool_hidden_states",
    "resolve_layer_weights",
]
