"""Exit rules: when a sample may leave, decided the same way online and offline.

`ExitConfig` says when a sample leaves (like `GenerationConfig` says how to generate, and is saved beside the model
as `exit_config.json`); `ExitDecider` applies it after each layer and `ExitLedger` records who left where, for the
runner in `early_exit.py` and for `simulate_exits` on precomputed per-layer logits (which calibration uses), so the two
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .compat import cached_file_or_none

EXIT_CONFIG_NAME = "exit_config.json"
EXIT_RULES = ("confidence", "margin", "entropy", "agreement", "patience", "fixed")
# Rules whose score is compared with `threshold`, and whether a larger score means "more sure".
THRESHOLD_RULES = {"confidence": True, "margin": True, "entropy": False, "agreement": True}


@dataclass
class ExitConfig:
    """When a sample may leave the model early; saved with the model as `exit_config.json`.

    Args:
        rule: `"confidence"`: leave once the largest softmax probability is at least `threshold`
            (`threshold=1.0` turns exits off); `"entropy"`: leave once the entropy of the softmax, divided by
            log(num_labels) so it lies in [0, 1], is at most `threshold`; `"agreement"`: leave once the largest softmax
            probability is at least `threshold` and the predicted class is the one the previous layer predicted
            (so not before `min_layer + 1`); `"patience"`: leave once the predicted class has stayed the same for
            `patience` consecutive layers (PABEE); `"fixed"`: every sample leaves at `exit_layer`.
        threshold: the confidence or normalized-entropy threshold.
        patience: consecutive unchanged predictions needed by the `"patience"` rule.
        exit_layer: the 1-based layer where the `"fixed"` rule exits.
        min_layer: the first layer at which a sample may leave (no classifier runs before it).
        max_layer: the layer at which every remaining sample leaves; defaults to the last layer.
        calibration: how `calibrate_exits` chose this setting (method, risk, tolerated risk, confidence, number of
            samples, certified bound), so the saved file keeps its guarantee; `None` for a setting chosen by hand.
            `update` drops it when any other field changes.
    """

    rule: str = "confidence"
    threshold: float = 1.0
    patience: int = 2
    exit_layer: int | None = None
    min_layer: int = 1
    max_layer: int | None = None
    calibration: dict[str, Any] | None = None

    def __post_init__(self):
        self.validate()

    def validate(self, num_layers: int | None = None) -> None:
        """Checks the fields, and against the model's depth when `num_layers` is given.

        Raises:
            ValueError: naming the field that is out of range or does not fit the rule.
        """
        if not isinstance(self.rule, str) or self.rule not in EXIT_RULES:
            raise ValueError(f"`rule={self.rule!r}` is not an exit rule; use one of {EXIT_RULES}.")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"`threshold={self.threshold!r}` must be a number.")
        for name in ("patience", "exit_layer", "min_layer", "max_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"`{name}={value!r}` must be an integer (a 1-based layer index or a count).")
        if self.rule == "confidence" and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"`threshold={self.threshold}` must lie in (0, 1] for rule 'confidence' (1.0: no exits).")
        if self.rule in ("margin", "agreement") and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"`threshold={self.threshold}` must lie in [0, 1] for rule {self.rule!r}.")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ValueError(
                f"`calibration` must be a dict (as `calibrate_exits` writes it) or None, not {self.calibration!r}."
            )
        if self.rule == "entropy" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"`threshold={self.threshold}` must lie in [0, 1] for rule 'entropy' (entropy is divided by "
                "log(num_labels))."
            )
        if self.patience < 1:
            raise ValueError(f"`patience={self.patience!r}` must be a positive integer.")
        if self.rule == "fixed" and self.exit_layer is None:
            raise ValueError("rule 'fixed' needs `exit_layer`, the 1-based layer where every sample leaves.")
        if self.rule != "fixed" and self.exit_layer is not None:
            raise ValueError(f"`exit_layer` is only used by rule 'fixed', not by rule {self.rule!r}; remove it.")
        if self.min_layer < 1:
            raise ValueError(f"`min_layer={self.min_layer!r}` must be a 1-based layer index (at least 1).")
        if self.max_layer is not None and self.max_layer < self.min_layer:
            raise ValueError(f"`max_layer={self.max_layer}` is below `min_layer={self.min_layer}`.")
        if self.exit_layer is not None and not self.min_layer <= self.exit_layer <= (
            self.max_layer or self.exit_layer
        ):
            raise ValueError(
                f"`exit_layer={self.exit_layer}` lies outside [min_layer, max_layer] = "
                f"[{self.min_layer}, {self.max_layer}]."
            )
        if num_layers is not None:
            for name in ("exit_layer", "min_layer", "max_layer"):
                value = getattr(self, name)
                if value is not None and value > num_layers:
                    raise ValueError(f"`{name}={value}` is deeper than the model, which has {num_layers} layers.")

    @property
    def never_exits(self) -> bool:
        """Whether no sample can leave before the last layer (`rule="confidence"` with `threshold=1.0`)."""
        return self.rule == "confidence" and self.threshold >= 1.0 and self.max_layer is None

    def last_layer(self, num_layers: int) -> int:
        """The layer at which every sample has left."""
        return self.exit_layer if self.rule == "fixed" else (self.max_layer or num_layers)

    def update(self, **overrides: Any) -> ExitConfig:
        """A copy with some fields replaced, validated; the calibration record is dropped unless the overrides leave
        every setting as it was (a changed setting no longer carries the calibrated guarantee).

        Raises:
            TypeError: naming an argument that is not an `ExitConfig` field.
        """
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{unknown} are not ExitConfig fields; the fields are {sorted(names)}.")
        changed = any(getattr(self, name) != value for name, value in overrides.items() if name != "calibration")
        if changed and "calibration" not in overrides:
            overrides = {**overrides, "calibration": None}
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes `exit_config.json` into `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, EXIT_CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> ExitConfig | None:
        """Reads `exit_config.json` from a local folder or a Hub repository; `None` if there is none.

        Raises:
            ValueError: naming the file, when it is not valid JSON, holds unknown keys or an invalid field.
        """
        path = cached_file_or_none(pretrained_model_name_or_path, EXIT_CONFIG_NAME, **hub_kwargs)
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            try:
                fields = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error}); fix or delete the file.") from error
        if not isinstance(fields, dict):
            raise ValueError(f"{path} must hold a JSON object of ExitConfig fields, not {type(fields).__name__}.")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; the ExitConfig fields are {sorted(names)}.")
        try:
            return cls(**fields)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def exit_scores(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The per-sample quantity a rule compares with its threshold: the largest probability (`"confidence"`,
    `"agreement"`), the largest minus the second largest (`"margin"`), or the normalized entropy (`"entropy"`)."""
    probabilities = logits.float().softmax(dim=-1)
    if rule in ("confidence", "agreement"):
        return probabilities.max(dim=-1).values
    if rule == "margin":
        if probabilities.shape[-1] < 2:
            return torch.ones(probabilities.shape[:-1], device=probabilities.device)
        top = probabilities.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(dim=-1)
    return entropy / math.log(logits.shape[-1])


class ExitDecider:
    """Applies an `ExitConfig` layer by layer to the samples still running (keeps the patience counters)."""

    def __init__(self, exit_config: ExitConfig, num_layers: int, batch_size: int, device: torch.device):
        self.config = exit_config
        self.last_layer = exit_config.last_layer(num_layers)
        self.previous = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.streak = torch.zeros(batch_size, dtype=torch.long, device=device)

    def classifies_at(self, layer: int) -> bool:
        """Whether the classifier must run after this layer (below `min_layer` nobody may leave)."""
        if self.config.rule == "fixed" or (self.config.rule == "confidence" and self.config.threshold >= 1.0):
            return layer == self.last_layer  # nobody can leave earlier: classify only where everyone leaves
        return layer >= self.config.min_layer

    def leaves(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Which of the running samples leave after `layer`, given their logits; a boolean mask."""
        if layer >= self.last_layer:
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        rule = self.config.rule
        if rule == "confidence":
            if self.config.threshold >= 1.0:
                return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
            return exit_scores(logits, rule) >= self.config.threshold
        if rule == "entropy":
            return exit_scores(logits, rule) <= self.config.threshold
        if rule == "margin":
            return exit_scores(logits, rule) >= self.config.threshold
        predictions = logits.argmax(dim=-1)
        if rule == "agreement":
            agrees = predictions == self.previous
            self.previous = predictions
            return agrees & (exit_scores(logits, rule) >= self.config.threshold)
        self.streak = torch.where(predictions == self.previous, self.streak + 1, torch.zeros_like(self.streak))
        self.previous = predictions
        return self.streak >= self.config.patience

    def keep(self, kept: torch.Tensor) -> None:
        """Drops the per-sample state of the samples that left (`kept` indexes the ones still running)."""
        if self.config.rule not in ("patience", "agreement"):
            return
        self.previous = self.previous[kept]
        self.streak = self.streak[kept]


@dataclass
class EarlyExitResult:
    """What `run_early_exit` computed, per original sample.

    Attributes:
        logits: `(batch, num_labels)` scores at each sample's exit layer.
        exit_layers: `(batch,)` 1-based layer at which each sample left.
        layers_computed: sum over blocks of the number of samples the block ran on (the compute actually spent).
    """

    logits: torch.Tensor
    exit_layers: torch.Tensor
    layers_computed: int


class ExitLedger:
    """Which samples are still running, and the logits and layer of each one that left.

    Online early exit and its offline simulation keep the same books: after each classified layer, the samples the
    rule lets go are recorded and the running set shrinks to those that stay.
    """

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size = batch_size
        self.running: torch.Tensor | None = None  # original indices of the running samples; None: all of them
        self.num_running = batch_size
        self.logits: torch.Tensor | None = None
        self.exit_layers = torch.zeros(batch_size, dtype=torch.long, device=device)

    def record(self, layer: int, layer_logits: torch.Tensor, leaving: torch.Tensor, num_leaving: int) -> torch.Tensor:
        """Records the running samples that leave after `layer`.

        Args:
            layer: the 1-based layer just classified.
            layer_logits: the running samples' logits after it.
            leaving: boolean mask over the running samples.
            num_leaving: `leaving.sum()`, already on the host (the caller decides when to synchronize).

        Returns:
            The positions, among the samples running before the call, of those that stay (empty once all left).
        """
        if self.logits is None:
            self.logits = layer_logits.new_zeros(self.batch_size, layer_logits.shape[-1])
        running = self.running if self.running is not None else torch.arange(self.batch_size, device=leaving.device)
        if num_leaving == self.num_running:
            self.logits[running] = layer_logits
            self.exit_layers[running] = layer
            self.running, self.num_running = running[:0], 0
            return running[:0]
        left = running[leaving]
        self.logits[left] = layer_logits[leaving]
        self.exit_layers[left] = layer
        kept = (~leaving).nonzero().squeeze(-1)
        self.running = running[kept]
        self.num_running -= num_leaving
        return kept


def simulate_exits(layer_logits: torch.Tensor, exit_config: ExitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies an exit rule to precomputed per-layer logits, exactly as early exit decides online.

    Args:
        layer_logits: `(num_layers, batch, num_labels)` logits of every layer.
        exit_config: the exit rule.

    Returns:
        The `(batch, num_labels)` logits at each sample's exit layer and the `(batch,)` exit layers.
    """
    num_layers, batch_size, _ = layer_logits.shape
    decider = ExitDecider(exit_config, num_layers, batch_size, layer_logits.device)
    ledger = ExitLedger(batch_size, layer_logits.device)
    for layer in range(1, decider.last_layer + 1):
        if not decider.classifies_at(layer):
            continue
        current = layer_logits[layer - 1] if ledger.running is None else layer_logits[layer - 1, ledger.running]
        leaving = decider.leaves(layer, current)
        num_leaving = int(leaving.sum())
        if num_leaving:
            decider.keep(ledger.record(layer, current, leaving, num_leaving))
    return ledger.logits, ledger.exit_layers
