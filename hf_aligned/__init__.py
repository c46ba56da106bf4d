"""hf_aligned: layer-aligned training and single-classifier multi-exit inference for Hugging Face Transformers.

Importing the package registers the `"aligned"` model type with transformers' Auto classes, so aligned checkpoints
load through `AutoConfig` and `AutoModelForSequenceClassification` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

from .alignment import AlignmentSettings, resolve_layer_weights
from .asr import ASRScale, add_asr, asr_folded_state_dict, asr_scales, fold_asr, has_asr, reset_asr
from .backbones import BackboneLayout, find_layout
from .calibration import CalibrationResult, calibrate_exits, calibration_grid
from .callbacks import RepresentationDynamicsCallback
from .card_data import AlignedModelCardData
from .configuration_aligned import AlignedConfig
from .data import collect_layer_logits, show_progress
from .exit_evaluation import (
    ExitCalibrationArguments,
    ExitEvaluation,
    calibrate_and_evaluate,
    evaluate_exits,
    format_exit_report,
)
from .exits import ExitConfig, simulate_exits
from .heads import CAUSAL_LM_HEADS, CausalLMHead, pool_hidden_states
from .hub import HubPushError, push_aligned_model
from .layouts import BRANCH_OUTPUTS, LAYOUTS
from .metrics import CausalLayerwiseMetrics, LayerwiseMetrics, format_layer_table, layer_values, minimal_depth
from .model_card import build_causal_lm_card, build_model_card, write_model_card
from .modeling_aligned import AlignedForSequenceClassification, AlignedPreTrainedModel
from .modeling_causal_lm import AlignedForCausalLM
from .outputs import AlignedCausalLMOutput, AlignedSequenceClassifierOutput, EarlyExitOutput
from .pipelines import AlignedTextClassificationPipeline
from .plotting import (
    plot_calibration,
    plot_dynamics,
    plot_layer_accuracy,
    plot_probability_similarity,
    plot_saturation,
    plot_similarity_heatmaps,
)
from .probes import ProbeResults, classifier_layer_accuracy, linear_probe_accuracy
from .saturation import (
    ProbabilitySimilarity,
    SaturationSummary,
    probability_similarity,
    saturation_layers,
    saturation_report,
    summarize_saturation,
)
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
from .speculative import SpeculationEstimate, suggest_assistant_early_exit
from .trainer import AlignedTrainer
from .training_args import AlignedTrainingArguments

__version__ = "0.1.0.dev0"

AutoConfig.register(AlignedConfig.model_type, AlignedConfig, exist_ok=True)
AutoModelForSequenceClassification.register(AlignedConfig, AlignedForSequenceClassification, exist_ok=True)
# An aligned ViT is an image classifier: registering it lets the image-classification pipeline accept it.
AutoModelForImageClassification.register(AlignedConfig, AlignedForSequenceClassification, exist_ok=True)

__all__ = [
    "BRANCH_OUTPUTS",
    "CAUSAL_LM_HEADS",
    "LAYOUTS",
    "ASRScale",
    "AlignedCausalLMOutput",
    "AlignedConfig",
    "AlignedForCausalLM",
    "AlignedForSequenceClassification",
    "AlignedModelCardData",
    "AlignedPreTrainedModel",
    "AlignedSequenceClassifierOutput",
    "AlignedTextClassificationPipeline",
    "AlignedTrainer",
    "AlignedTrainingArguments",
    "AlignmentSettings",
    "BackboneLayout",
    "CalibrationResult",
    "CausalLMHead",
    "CausalLayerwiseMetrics",
    "EarlyExitOutput",
    "ExitCalibrationArguments",
    "ExitConfig",
    "ExitEvaluation",
    "HubPushError",
    "LayerwiseMetrics",
    "MinibatchCKA",
    "ProbabilitySimilarity",
    "ProbeResults",
    "RepresentationDynamicsCallback",
    "SaturationSummary",
    "SpeculationEstimate",
    "add_asr",
    "asr_folded_state_dict",
    "asr_scales",
    "build_causal_lm_card",
    "build_model_card",
    "calibrate_and_evaluate",
    "calibrate_exits",
    "calibration_grid",
    "cka_matrix",
    "classifier_layer_accuracy",
    "collect_layer_logits",
    "cosine_similarity_matrix",
    "evaluate_exits",
    "find_layout",
    "fold_asr",
    "format_exit_report",
    "format_layer_table",
    "has_asr",
    "iter_layer_representations",
    "layer_representations",
    "layer_values",
    "layerwise_cka",
    "linear_cka",
    "linear_probe_accuracy",
    "minibatch_cka",
    "minimal_depth",
    "off_diagonal_mean",
    "plot_calibration",
    "plot_dynamics",
    "plot_layer_accuracy",
    "plot_probability_similarity",
    "plot_saturation",
    "plot_similarity_heatmaps",
    "pool_hidden_states",
    "probability_similarity",
    "push_aligned_model",
    "reset_asr",
    "resolve_layer_weights",
    "sample_cosine",
    "saturation_layers",
    "saturation_report",
    "show_progress",
    "similarity_agreement",
    "similarity_by_distance",
    "simulate_exits",
    "suggest_assistant_early_exit",
    "summarize_saturation",
    "unbiased_hsic_matrix",
    "write_model_card",
]
