"""Calibration benchmark: does the certified exit calibration keep its promise, and what speed-up does it leave?

Reads the per-layer logits of the recipes checkpoints over pools of unseen data (benchmarks/calibration_data.py:
SST-2: its 2,693 labelled dev + test sentences; AG News: the 5,200 items of its test release each seed never trained
on), for the library default (`recommended`) and per-layer heads (`per_layer`), seeds 0, 1 and 2. For each seed and
calibration size n, `DRAWS` random calibration sets of n items are drawn from the pool; each is calibrated by every
method and the chosen setting is applied to the rest of the pool:

- `ltt`: `calibrate_exits`' default, Learn then Test over `calibration_grid`, for each risk (`consistency`: needs no
  labels; `accuracy`) and each exit score (confidence, margin, entropy, agreement = confidence gated by agreement
  with the previous layer, patience);
- `empirical`: the old rule (fastest grid setting whose accuracy on the calibration draw is within the tolerance).

Per method and n it reports the share of draws whose realized accuracy drop on the rest of the pool exceeds the
tolerance epsilon (the guarantee says: at most delta, for n at least the stated minimum), the mean drop, the mean
ideal speed-up (L / mean exit layer) and the oracle speed-up (the best grid setting chosen on the evaluation data
itself, drop <= epsilon). The `speed` phase measures the wall-clock speed-up at batch 32 of every distinct setting
the headline method chose (each timed once on a fixed evaluation subset: `early_exit_predict` against the full
forward, alternately, one thread, the ratio within one run). The headline method chooses dozens of distinct
thresholds over its draws, too many to time each on the CPU available, so three are timed per checkpoint (quantiles
of its chosen thresholds) and a method's measured speed-up is its mean ideal speed-up times the mean measured/ideal
efficiency of its draws, each draw taking the efficiency of the timed threshold nearest to its own. Also: per-layer heads against one shared classifier at equal guaranteed drop, and a distribution shift
(SST-2: calibrate on training phrases, evaluate on the dev/test sentences).

    python benchmarks/calibration_data.py                   # the checkpoints and logits (about 1 h, one core)
    python benchmarks/calibration.py                        # the statistics (a few minutes)
    python benchmarks/calibration.py --phase speed          # measured speed-ups of the chosen settings
    python benchmarks/calibration.py --phase render         # tables into docs/early_exit.md, README.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch
from calibration_data import DATA, TASKS, VARIANTS, pools
from common import REPO, describe_machine, write_json

from hf_aligned.calibration import (
    CALIBRATION_RULES,
    DEFAULT_CALIBRATION_RULE,
    calibration_grid,
    exit_losses,
    exit_outcomes,
)
from hf_aligned.risk_control import binomial_p_values, fixed_sequence_test, minimum_samples

RESULTS = REPO / "benchmarks" / "results" / "calibration.json"
SEEDS = (0, 1, 2)
DRAWS = 500
EPSILON, DELTA = 0.01, 0.1
SIZES = {"sst2": (300, 1000), "ag_news": (300, 1000, 3000)}
HEADLINE_SIZE = 1000
# The exit score `calibrate_exits` uses by default (the headline rows, the speed phase, the curves and the shift).
DEFAULT_RULE = DEFAULT_CALIBRATION_RULE
# The methods compared: (method, risk, rule).
METHODS = [
    *(("ltt", "consistency", rule) for rule in CALIBRATION_RULES),
    *(("ltt", "accuracy", rule) for rule in CALIBRATION_RULES),
    ("empirical", "accuracy", "confidence"),
]
EPSILONS_CURVE = (0.005, 0.01, 0.02, 0.05)
TIMED_SAMPLES = 192
RENDERED_DOCUMENTS = ("README.md", "docs/early_exit.md")


def method_key(method: str, risk: str, rule: str) -> str:
    return f"{method}/{risk}/{rule}"


def load_logits(task: str, variant: str, seed: int, data: Path = DATA) -> dict[str, np.ndarray]:
    path = data / f"{task}_{variant}_seed{seed}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run benchmarks/calibration_data.py first.")
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


class Outcomes:
    """Every grid setting of every rule applied once to a whole pool: per setting and sample, the exit layer,
    whether the prediction is right, and whether it differs from full depth."""

    def __init__(self, layer_logits: np.ndarray, labels: np.ndarray):
        logits = torch.from_numpy(layer_logits).float()
        self.num_layers = logits.shape[0]
        self.labels = torch.from_numpy(labels).long()
        full = logits[-1].argmax(-1)
        self.full_correct = (full == self.labels).numpy().astype(np.float32)
        self.rules: dict[str, dict[str, np.ndarray]] = {}
        for rule in CALIBRATION_RULES:
            values = calibration_grid(rule, self.num_layers)
            predictions, layers = exit_outcomes(logits, rule, values)
            self.rules[rule] = {
                "values": np.array(values),
                "layers": layers.numpy().astype(np.float32),
                "correct": (predictions == self.labels).numpy().astype(np.float32),
                "consistency": exit_losses(predictions, full, None, "consistency").numpy().astype(np.float32),
                "accuracy": exit_losses(predictions, full, self.labels, "accuracy").numpy().astype(np.float32),
            }


def draw_masks(num_items: int, size: int, draws: int, seed: int) -> np.ndarray:
    """`(draws, num_items)` 0/1 float masks, each selecting `size` random items."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((draws, num_items)), axis=1)[:, :size]
    masks = np.zeros((draws, num_items), dtype=np.float32)
    np.put_along_axis(masks, order, 1.0, axis=1)
    return masks


def choose(method: str, risk: str, sums: dict[str, np.ndarray], size: int, epsilon: float, delta: float) -> np.ndarray:
    """Per draw, the index of the chosen grid setting (-1: never exit), from the calibration sums of each setting."""
    mean_layers = sums["layers"] / size
    if method == "ltt":
        p_values = binomial_p_values(np.rint(sums[risk]).astype(np.int64), size, epsilon)
        certified = fixed_sequence_test(p_values, delta)
        admissible = np.arange(p_values.shape[1])[None, :] < certified[:, None]
    else:
        drop = (sums["full_correct"][:, None] - sums["correct"]) / size
        admissible = drop <= epsilon + 1e-12
    masked = np.where(admissible, mean_layers, np.inf)
    chosen = masked.argmin(axis=1)
    return np.where(np.isfinite(masked.min(axis=1)), chosen, -1)


def sums_over(masks: np.ndarray, outcomes: Outcomes, rule: str) -> dict[str, np.ndarray]:
    """Per draw and grid setting, the sums over the selected items (matrix products, all draws at once)."""
    table = outcomes.rules[rule]
    sums = {name: masks @ table[name].T for name in ("layers", "correct", "consistency", "accuracy")}
    sums["full_correct"] = masks @ outcomes.full_correct
    return sums


def evaluate_draws(outcomes: Outcomes, masks: np.ndarray, evaluation_masks: np.ndarray, epsilon: float, delta: float):
    """Per method: for each draw, the chosen setting, the realized accuracy drop and disagreement on the evaluation
    items, and the ideal speed-up there; plus the oracle speed-up of each draw."""
    size = int(masks[0].sum())
    num_evaluation = evaluation_masks.sum(axis=1)
    results, oracle = {}, None
    for rule in CALIBRATION_RULES:
        calibration_sums = sums_over(masks, outcomes, rule)
        evaluation_sums = sums_over(evaluation_masks, outcomes, rule)
        full_accuracy = evaluation_sums["full_correct"] / num_evaluation
        accuracy = evaluation_sums["correct"] / num_evaluation[:, None]
        drop = full_accuracy[:, None] - accuracy
        layers = evaluation_sums["layers"] / num_evaluation[:, None]
        disagreement = evaluation_sums["consistency"] / num_evaluation[:, None]
        best = np.where(drop <= epsilon, outcomes.num_layers / layers, 1.0).max(axis=1)
        table = outcomes.rules[rule]
        pool_drop = outcomes.full_correct.mean() - table["correct"].mean(axis=1)
        pool_risk = {risk: table[risk].mean(axis=1) for risk in ("consistency", "accuracy")}
        oracle = best if oracle is None else np.maximum(oracle, best)
        for method, risk, method_rule in METHODS:
            if method_rule != rule:
                continue
            chosen = choose(method, risk, calibration_sums, size, epsilon, delta)
            rows = np.arange(len(chosen))
            picked = np.maximum(chosen, 0)
            never = chosen < 0
            results[method_key(method, risk, rule)] = {
                "chosen": np.where(never, np.nan, outcomes.rules[rule]["values"][picked]),
                "drop": np.where(never, 0.0, drop[rows, picked]),
                "disagreement": np.where(never, 0.0, disagreement[rows, picked]),
                "ideal_speedup": np.where(never, 1.0, outcomes.num_layers / layers[rows, picked]),
                "pool_drop": np.where(never, 0.0, pool_drop[picked]),
                "pool_risk": np.where(never, 0.0, pool_risk[risk][picked]),
            }
    return results, oracle


def summarize_draws(draws: dict[str, np.ndarray], epsilon: float) -> dict:
    return {
        "share_drop_above_epsilon": float((draws["drop"] > epsilon + 1e-9).mean()),
        "share_disagreement_above_epsilon": float((draws["disagreement"] > epsilon + 1e-9).mean()),
        "mean_drop": float(draws["drop"].mean()),
        "mean_ideal_speedup": float(draws["ideal_speedup"].mean()),
        "share_never_exit": float(np.isnan(draws["chosen"]).mean()),
        **(
            {
                "share_pool_drop_above_epsilon": float((draws["pool_drop"] > epsilon + 1e-9).mean()),
                "share_pool_risk_above_epsilon": float((draws["pool_risk"] > epsilon + 1e-9).mean()),
            }
            if "pool_risk" in draws
            else {}
        ),
    }


def chosen_counts(values: np.ndarray) -> dict[str, int]:
    """How often each setting was chosen ("never" for no exit), for the speed phase."""
    keys, counts = np.unique(np.where(np.isnan(values), -1.0, values), return_counts=True)
    return {("never" if key < 0 else str(float(key))): int(count) for key, count in zip(keys, counts)}


def analyze_run(task: str, variant: str, seed: int, data: Path, draws: int) -> dict:
    """Every statistic of one checkpoint: per calibration size and method, over `draws` random calibration sets."""
    arrays = load_logits(task, variant, seed, data)
    outcomes = Outcomes(arrays["pool_logits"], arrays["pool_labels"])
    num_items = len(arrays["pool_labels"])
    layer_accuracy = (arrays["pool_logits"].argmax(-1) == arrays["pool_labels"][None]).mean(axis=1)
    record = {"pool_size": num_items, "pool_layer_accuracy": layer_accuracy.tolist(), "sizes": {}}
    for size in SIZES[task]:
        masks = draw_masks(num_items, size, draws, seed=hash_seed(task, variant, seed, size))
        results, oracle = evaluate_draws(outcomes, masks, 1.0 - masks, EPSILON, DELTA)
        record["sizes"][str(size)] = {
            "oracle_speedup": float(oracle.mean()),
            "methods": {
                key: {**summarize_draws(values, EPSILON), "chosen_counts": chosen_counts(values["chosen"])}
                for key, values in results.items()
            },
        }
    record["epsilon_curve"] = epsilon_curve(outcomes, num_items, draws, hash_seed(task, variant, seed, 0))
    if "shift_logits" in arrays:
        record["shift"] = shift_example(outcomes, arrays, draws, hash_seed(task, variant, seed, 1))
    return record


def hash_seed(task: str, variant: str, seed: int, size: int) -> int:
    """A fixed seed per (task, variant, seed, size); per-layer heads and the shared classifier get the same draws."""
    return 1_000_003 * seed + 7919 * size + 13 * TASKS.index(task)


def epsilon_curve(outcomes: Outcomes, num_items: int, draws: int, seed: int) -> dict[str, dict]:
    """The headline method (`ltt`, consistency, confidence) at n = HEADLINE_SIZE for several tolerances."""
    masks = draw_masks(num_items, HEADLINE_SIZE, draws, seed)
    curve = {}
    for epsilon in EPSILONS_CURVE:
        results, oracle = evaluate_draws(outcomes, masks, 1.0 - masks, epsilon, DELTA)
        summary = summarize_draws(results[method_key("ltt", "consistency", DEFAULT_RULE)], epsilon)
        curve[f"{epsilon:g}"] = {**summary, "oracle_speedup": float(oracle.mean())}
    return curve


def shift_example(outcomes: Outcomes, arrays: dict, draws: int, seed: int) -> dict:
    """Calibrate on n = HEADLINE_SIZE training phrases, evaluate on the whole pool of dev/test sentences."""
    shifted = Outcomes(arrays["shift_logits"], arrays["shift_labels"])
    masks = draw_masks(len(arrays["shift_labels"]), HEADLINE_SIZE, draws, seed)
    result = {}
    for method, risk, rule in METHODS:
        if method_key(method, risk, rule) not in METHOD_LABELS:
            continue
        sums = sums_over(masks, shifted, rule)
        chosen = choose(method, risk, sums, HEADLINE_SIZE, EPSILON, DELTA)
        table = outcomes.rules[rule]
        full = outcomes.full_correct.mean()
        picked = np.maximum(chosen, 0)
        never = chosen < 0
        draws_result = {
            "chosen": np.where(never, np.nan, table["values"][picked]),
            "drop": np.where(never, 0.0, full - table["correct"].mean(axis=1)[picked]),
            "disagreement": np.where(never, 0.0, table["consistency"].mean(axis=1)[picked]),
            "ideal_speedup": np.where(never, 1.0, outcomes.num_layers / table["layers"].mean(axis=1)[picked]),
        }
        result[method_key(method, risk, rule)] = summarize_draws(draws_result, EPSILON)
    return result


SPEED_METHODS = (method_key("ltt", "consistency", DEFAULT_RULE),)
TIMED_QUANTILES = (0.1, 0.5, 0.9)


def speed_run(task: str, variant: str, seed: int, settings: list[str], data: Path, repeats: int) -> dict[str, dict]:
    """Measured speed-up (batch 32, this process's threads) of each setting (`rule:value`, or `never`) on a fixed
    subset of the pool, through `evaluate_exits` (early_exit_predict against the full forward, timed alternately)."""
    from datasets import Dataset
    from recipes import TASK_DEFAULTS
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_aligned import AlignedForSequenceClassification, ExitConfig, evaluate_exits

    tokenizer = AutoTokenizer.from_pretrained(minilm())
    pool = pools(task, seed)["pool"]
    step = max(1, len(pool) // TIMED_SAMPLES)
    rows = pool.select(range(0, step * TIMED_SAMPLES, step))
    encoded = tokenizer(list(rows["text"]), truncation=True, max_length=TASK_DEFAULTS[task]["max_length"])
    dataset = Dataset.from_dict({**encoded, "labels": list(rows["label"])})
    collator = DataCollatorWithPadding(tokenizer)
    model = AlignedForSequenceClassification.from_pretrained(data / "checkpoints" / task / variant / f"seed{seed}")
    measured = {}
    for setting in settings:
        rule, _, value = setting.partition(":")
        exit_config = (
            ExitConfig() if setting == "never" else ExitConfig(rule=rule, **{_parameter(rule): _number(rule, value)})
        )
        evaluation = evaluate_exits(model.eval(), dataset, exit_config, collate_fn=collator, repeats=repeats)
        measured[setting] = {
            "measured_speedup": evaluation.measured_speedup,
            "ideal_speedup": evaluation.ideal_speedup,
        }
        print(f"  {task}/{variant}/{seed} {setting}: {evaluation.measured_speedup:.2f}x", flush=True)
    return measured


def minilm() -> str:
    from common import minilm_path

    return minilm_path()


def speed_phase(results: dict, data: Path, repeats: int) -> None:
    """Times every distinct setting the speed methods chose, per checkpoint; resumable (the JSON is written after
    every checkpoint)."""
    import torch

    torch.set_num_threads(1)
    for key, record in results["runs"].items():
        task, variant, seed = key.split("/")
        wanted = {_timed_name(DEFAULT_RULE, value) for value in timed_settings(record)}
        done = results.setdefault("speed", {}).setdefault(key, {"timed_samples": TIMED_SAMPLES, "settings": {}})
        missing = sorted(wanted - set(done["settings"]))
        if not missing:
            continue
        done["settings"].update(speed_run(task, variant, int(seed), missing, data, repeats))
        done["torch_threads"] = torch.get_num_threads()
        write_json(RESULTS, results)


def timed_settings(record: dict) -> list[str]:
    """The settings timed for a checkpoint: quantiles (`TIMED_QUANTILES`) of the thresholds the headline method chose,
    over its draws at every calibration size."""
    values = []
    for size in record["sizes"].values():
        for method in SPEED_METHODS:
            for value, count in size["methods"][method]["chosen_counts"].items():
                values += [value] * count
    values.sort(key=lambda value: -1.0 if value == "never" else float(value))
    return sorted({values[int(quantile * (len(values) - 1))] for quantile in TIMED_QUANTILES})


def _parameter(rule: str) -> str:
    return "patience" if rule == "patience" else "threshold"


def _number(rule: str, value: str) -> float | int:
    return int(float(value)) if rule == "patience" else float(value)


def _timed_name(rule: str, value: str) -> str:
    return "never" if value == "never" else f"{rule}:{value}"


def measured_speedup(results: dict, key: str, method: str, counts: dict[str, int], ideal: float) -> float | None:
    """A method's measured speed-up: its mean ideal speed-up times the mean measured/ideal efficiency of its draws,
    each draw's setting taken as the timed setting nearest to it (`never`: 1). None for another rule or untimed
    checkpoints."""
    timed = results.get("speed", {}).get(key, {}).get("settings", {})
    rule = method.split("/")[-1]
    points = {
        float(name.partition(":")[2]): entry["measured_speedup"] / entry["ideal_speedup"]
        for name, entry in timed.items()
        if name.startswith(f"{rule}:")
    }
    if not points:
        return None
    efficiencies = []
    for value, count in counts.items():
        nearest = 1.0 if value == "never" else points[min(points, key=lambda point: abs(point - float(value)))]
        efficiencies += [nearest] * count
    return ideal * statistics.fmean(efficiencies)


def mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarize(results: dict) -> dict:
    """Per task, variant, n and method: over seeds, the worst and mean share of draws above epsilon, mean drop,
    ideal, measured and oracle speed-ups (mean ± std over seeds)."""
    summary: dict = {}
    for key, record in results["runs"].items():
        task, variant, _ = key.split("/")
        for size, entry in record["sizes"].items():
            for method, values in entry["methods"].items():
                cell = summary.setdefault(task, {}).setdefault(variant, {}).setdefault(size, {}).setdefault(method, [])
                cell.append(
                    {
                        **values,
                        "oracle": entry["oracle_speedup"],
                        "measured": measured_speedup(
                            results, key, method, values["chosen_counts"], values["mean_ideal_speedup"]
                        ),
                    }
                )
    for variants in summary.values():
        for sizes in variants.values():
            for methods in sizes.values():
                for method, seeds in methods.items():
                    measured = [seed["measured"] for seed in seeds]
                    methods[method] = {
                        "seeds": len(seeds),
                        "worst_share_drop_above_epsilon": max(seed["share_drop_above_epsilon"] for seed in seeds),
                        "worst_share_pool_risk_above_epsilon": max(
                            seed["share_pool_risk_above_epsilon"] for seed in seeds
                        ),
                        "share_drop_above_epsilon": mean_std([seed["share_drop_above_epsilon"] for seed in seeds]),
                        "mean_drop": mean_std([seed["mean_drop"] for seed in seeds]),
                        "ideal_speedup": mean_std([seed["mean_ideal_speedup"] for seed in seeds]),
                        "measured_speedup": mean_std(measured) if None not in measured else None,
                        "oracle_speedup": mean_std([seed["oracle"] for seed in seeds]),
                    }
    return summary


def curve_summary(results: dict) -> dict:
    """Per task, variant and epsilon: the headline method's ideal speed-up and shares, mean over seeds."""
    curves: dict = {}
    for key, record in results["runs"].items():
        task, variant, _ = key.split("/")
        for epsilon, values in record["epsilon_curve"].items():
            curves.setdefault(task, {}).setdefault(variant, {}).setdefault(epsilon, []).append(values)
    return {
        task: {
            variant: {
                epsilon: {
                    "seeds": len(seeds),
                    "ideal_speedup": mean_std([seed["mean_ideal_speedup"] for seed in seeds]),
                    "oracle_speedup": mean_std([seed["oracle_speedup"] for seed in seeds]),
                    "worst_share_drop_above_epsilon": max(seed["share_drop_above_epsilon"] for seed in seeds),
                }
                for epsilon, seeds in by_epsilon.items()
            }
            for variant, by_epsilon in variants.items()
        }
        for task, variants in curves.items()
    }


SPEED_TARGETS = {"ag_news": 2.0, "sst2": 1.8}


def targets(summary: dict) -> dict:
    """The issue's targets: every certified method's share <= delta at every n, task and seed; the measured speed-up
    of the unlabelled headline method at n = 1,000."""
    checks = {}
    worst = max(
        (entry["worst_share_drop_above_epsilon"], f"{task}/{size}/{method}")
        for task, variants in summary.items()
        for size, methods in variants.get("recommended", {}).items()
        for method, entry in methods.items()
        if method.startswith("ltt/") and int(size) >= minimum_samples(EPSILON, DELTA)
    )
    checks["certified methods: share of draws with drop > epsilon <= delta (every task, n, seed)"] = {
        "value": worst[0],
        "where": worst[1],
        "met": worst[0] <= DELTA,
    }
    for task, target in SPEED_TARGETS.items():
        entry = summary.get(task, {}).get("recommended", {}).get(str(HEADLINE_SIZE), {})
        headline = entry.get(method_key("ltt", "consistency", DEFAULT_RULE))
        if headline is None or headline["measured_speedup"] is None:
            continue
        value = headline["measured_speedup"][0]
        checks[f"{task}: measured speed-up >= {target}x (n = 1,000 unlabelled)"] = {
            "value": value,
            "oracle": headline["oracle_speedup"][0],
            "met": value >= target,
        }
    return checks


TASK_LABELS = {"sst2": "SST-2", "ag_news": "AG News"}
METHOD_LABELS = {
    method_key("ltt", "consistency", DEFAULT_RULE): "certified, unlabelled (`risk='consistency'`, default)",
    method_key("ltt", "accuracy", DEFAULT_RULE): "certified, labelled (`risk='accuracy'`)",
    method_key("empirical", "accuracy", "confidence"): "old rule, no guarantee (`method='empirical'`)",
}


def _pm(pair, scale=1.0, digits=2, suffix="") -> str:
    if pair is None:
        return "-"
    return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}{suffix}"


def guarantee_table(summary: dict, task: str) -> str:
    """Markdown: per n and method, the share of draws over the tolerance, mean drop and speed-ups (recommended)."""
    lines = [
        f"| {TASK_LABELS[task]}: n | method | draws with drop > 1 pt (worst seed) | mean drop (pt) | ideal speed-up | "
        "measured speed-up, batch 32 | oracle at ≤ 1 pt |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, methods in summary[task]["recommended"].items():
        for method, label in METHOD_LABELS.items():
            entry = methods[method]
            lines.append(
                f"| {int(size):,} | {label} | {entry['worst_share_drop_above_epsilon'] * 100:.1f}% | "
                f"{_pm(entry['mean_drop'], 100, 2)} | {_pm(entry['ideal_speedup'], suffix='x')} | "
                f"{_pm(entry['measured_speedup'], suffix='x')} | {_pm(entry['oracle_speedup'], suffix='x')} |"
            )
    return "\n".join(lines)


def scores_table(summary: dict) -> str:
    """Markdown: per exit score, the certified ideal speed-up at n = 1,000 for each risk and task (recommended)."""
    tasks = [task for task in TASKS if task in summary]
    header = " | ".join(f"{TASK_LABELS[task]}, {risk}" for task in tasks for risk in ("unlabelled", "labelled"))
    lines = [f"| exit score | {header} |", "|---|" + "---|" * (2 * len(tasks))]
    for rule in CALIBRATION_RULES:
        cells = []
        for task in tasks:
            methods = summary[task]["recommended"][str(HEADLINE_SIZE)]
            for risk in ("consistency", "accuracy"):
                entry = methods[method_key("ltt", risk, rule)]
                cells.append(_pm(entry["ideal_speedup"], suffix="x"))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heads_table(curves: dict) -> str:
    """Markdown: certified ideal speed-up (unlabelled, n = 1,000) by tolerance, shared classifier vs per-layer heads."""
    tasks = [task for task in TASKS if task in curves]
    header = " | ".join(
        f"{TASK_LABELS[task]}, {name}" for task in tasks for name in ("one classifier", "per-layer heads")
    )
    lines = [f"| tolerated disagreement | {header} |", "|---|" + "---|" * (2 * len(tasks))]
    for epsilon in (f"{value:g}" for value in EPSILONS_CURVE):
        cells = []
        for task in tasks:
            for variant in VARIANTS:
                entry = curves[task].get(variant, {}).get(epsilon)
                cells.append(
                    "-" if entry is None else f"{_pm(entry['ideal_speedup'], suffix='x')} ({entry['seeds']} seeds)"
                )
        lines.append(f"| {float(epsilon) * 100:g}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shift_table(results: dict) -> str:
    """Markdown: SST-2, calibrated on training phrases, evaluated on dev/test sentences (mean over seeds)."""
    runs = [record["shift"] for key, record in results["runs"].items() if key.startswith("sst2/recommended/")]
    lines = [
        "| calibrated on 1,000 SST-2 training phrases | draws with drop > 1 pt (worst seed) | mean drop (pt) | "
        "ideal speed-up |",
        "|---|---|---|---|",
    ]
    for method, label in METHOD_LABELS.items():
        worst = max(run[method]["share_drop_above_epsilon"] for run in runs)
        drop = mean_std([run[method]["mean_drop"] for run in runs])
        speed = mean_std([run[method]["mean_ideal_speedup"] for run in runs])
        lines.append(f"| {label} | {worst * 100:.1f}% | {_pm(drop, 100, 2)} | {_pm(speed, suffix='x')} |")
    return "\n".join(lines)


def targets_table(checks: dict) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, check in checks.items():
        if "speed-up" in name:
            shown = f"{check['value']:.2f}x (oracle at ≤ 1 pt, ideal: {check['oracle']:.2f}x)"
        else:
            shown = f"{check['value'] * 100:.1f}% ({check['where']})"
        lines.append(f"| {name} | {shown} | {'yes' if check['met'] else '**no**'} |")
    return "\n".join(lines)


def headline_table(summary: dict) -> str:
    """Markdown for the README: the default calibration at 1 pt, 90% confidence, 1,000 unlabelled samples."""
    lines = [
        "| task (1,000 unlabelled calibration samples) | draws with drop > 1 pt | measured speed-up | old rule: draws "
        "with drop > 1 pt |",
        "|---|---|---|---|",
    ]
    for task in (task for task in TASKS if task in summary):
        methods = summary[task]["recommended"][str(HEADLINE_SIZE)]
        certified = methods[method_key("ltt", "consistency", DEFAULT_RULE)]
        old = methods[method_key("empirical", "accuracy", "confidence")]
        lines.append(
            f"| {TASK_LABELS[task]} | {certified['worst_share_drop_above_epsilon'] * 100:.1f}% | "
            f"{_pm(certified['measured_speedup'], suffix='x')} | {old['worst_share_drop_above_epsilon'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def setup_text(results: dict) -> str:
    seeds = sorted({int(key.split("/")[2]) for key in results["runs"]})
    pool = {task: record["pool_size"] for key, record in results["runs"].items() for task in [key.split("/")[0]]}
    return (
        f"{results['settings']['draws']} random calibration draws per seed (seeds {', '.join(map(str, seeds))}) from "
        f"the pools of unseen data (SST-2: {pool.get('sst2', 0):,} dev + test sentences; AG News: "
        f"{pool.get('ag_news', 0):,} items), each evaluated on the rest of its pool; epsilon = 1 pt, delta = 0.1 "
        f"(at least {minimum_samples(EPSILON, DELTA)} samples needed). Worst seed for shares, mean ± std over seeds "
        "otherwise."
    )


def render_blocks(results: dict) -> dict[str, str]:
    summary, curves = results["summary"], results["curves"]
    blocks = {
        "calibration-setup": setup_text(results),
        "calibration-scores": scores_table(summary),
        "calibration-heads": heads_table(curves),
        "calibration-targets": targets_table(results["targets"]),
        "calibration-headline": headline_table(summary),
    }
    if any(key.startswith("sst2/recommended/") for key in results["runs"]):
        blocks["calibration-shift"] = shift_table(results)
    for task in summary:
        blocks[f"calibration-guarantee-{task}"] = guarantee_table(summary, task)
    return blocks


def analyze_phase(results: dict, data: Path, draws: int) -> None:
    reproduced = json.loads((data / "runs.json").read_text()) if (data / "runs.json").exists() else {}
    for variant in VARIANTS:
        for seed in SEEDS:
            for task in TASKS:
                key = f"{task}/{variant}/{seed}"
                if not (data / f"{task}_{variant}_seed{seed}.npz").exists():
                    continue
                record = analyze_run(task, variant, seed, data, draws)
                record["recipes_layer_accuracy_difference"] = reproduced.get(key, {}).get(
                    "max_layer_accuracy_difference"
                )
                results["runs"][key] = record
                print(f"analyzed {key}", flush=True)


def run_provenance(record: dict, started: float, seeds: list[int]) -> dict:
    return {
        **record,
        "seeds": seeds,
        "machine": describe_machine()["cpu"],
        "duration_s": round(time.perf_counter() - started, 1),
    }


def data_provenance(data: Path, seeds: list[int]) -> dict:
    """How the logits were made (benchmarks/calibration_data.py's runs.json): command, commits, total wall time."""
    runs = json.loads((data / "runs.json").read_text()) if (data / "runs.json").exists() else {}
    records = list(runs.values())
    return {
        "command": records[0]["provenance"]["command"] if records else "python benchmarks/calibration_data.py",
        "commit": records[0]["provenance"]["commit"] if records else "unknown",
        "machine": records[0]["provenance"]["machine"] if records else "unknown",
        "seeds": seeds,
        "duration_s": round(sum(record["wall_time_s"] + record["logits_time_s"] for record in records), 1),
    }


def main() -> None:
    from recipes import provenance, write_blocks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["analyze", "speed", "render"], default="analyze")
    parser.add_argument("--data", type=Path, default=DATA, help="the folder benchmarks/calibration_data.py wrote")
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path per setting (speed phase)")
    parser.add_argument("--fresh-speed", action="store_true", help="analyze: drop the speed measurements kept so far")
    options = parser.parse_args()
    started = time.perf_counter()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    if options.phase == "analyze":
        results["runs"] = {}
        analyze_phase(results, options.data, options.draws)
        results["settings"] = {"epsilon": EPSILON, "delta": DELTA, "draws": options.draws, "sizes": SIZES}
        seeds = sorted({int(key.split("/")[2]) for key in results["runs"]})
        results["provenance"] = [
            data_provenance(options.data, seeds),
            run_provenance(provenance(sys.argv), started, seeds),
        ]
        if options.fresh_speed:
            results.pop("speed", None)
    elif options.phase == "speed":
        speed_phase(results, options.data, options.repeats)
        seeds = sorted({int(key.split("/")[2]) for key in results["runs"]})
        results["provenance"] = [*results["provenance"][:2], run_provenance(provenance(sys.argv), started, seeds)]
    results["summary"] = summarize(results)
    results["curves"] = curve_summary(results)
    results["targets"] = targets(results["summary"])
    write_json(RESULTS, results)
    for name, block in render_blocks(results).items():
        print(f"\n{name}\n{block}")
    if options.phase == "render":
        for path in write_blocks(render_blocks(results), RENDERED_DOCUMENTS):
            print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
