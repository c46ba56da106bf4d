"""Reproduction report: runs the benchmarks behind the paper's claims, then renders docs/results.md from their JSON.

The claims (Jiang, Zhou, Zhu, arXiv 2406.14479), each on the real data here:
1. aligned training makes the last layer's classifier work after every layer (standard vs aligned vs per-layer heads,
   layer by layer): MiniLM on SST-2 (`benchmarks/train_aligned.py`) and a small ViT on digits (`examples/demo.py`);
2. sample-wise cosine similarity (COS) agrees with CKA across layers (`benchmarks/similarity.py`, on the trainer
   benchmark's SST-2 models and on a synthetic 12-block residual stream);
3. as a multi-exit model, the single classifier is on par with one classifier per layer: accuracy against ideal and
   measured speedup (`benchmarks/early_exit.py`: MiniLM on SST-2 and AG News, ViT on digits);
4. (ICLR version) probability of the last layer's class rises with similarity to the last layer, and aligned training
   saturates earlier (`benchmarks/saturation.py`: standard, aligned and per-layer heads on SST-2, AG News, digits).

By default the five scripts run one after another in subprocesses, the SST-2 checkpoints of the trainer benchmark
passed to the other two so nothing is trained twice, then the report is rendered. Every number in docs/results.md is
read from the scripts' JSON; the figures are drawn from it (or copied where a script draws its own) into
docs/figures/, and docs/figures/headline.png is the one README shows.

    flock /tmp/hf_aligned_cpu.lock python benchmarks/reproduce.py   # everything (about 45 minutes on 2 CPU cores)
    python benchmarks/reproduce.py --render-only                     # re-render from outputs/benchmarks/
    python benchmarks/reproduce.py --render-only --outputs DIR --allow-missing
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asr as asr_benchmark
from common import OUTPUTS, REPO, describe_machine, print_table, write_json
from recipes import FIGURE as RECIPES_FIGURE
from recipes import RESULTS as RECIPES_RESULTS
from recipes import draw_layers, render_blocks, replace_blocks

from hf_aligned import layer_values

DOCS = REPO / "docs"
MANIFEST = "reproduce.json"
EXIT_TASKS = ("sst2-minilm", "ag_news-minilm", "digits-vit")
# Model kinds, as the benchmarks name them, -> how the report names them.
KINDS = {"standard": "standard", "aligned": "aligned", "per_layer": "per-layer heads"}
COLORS = {"standard": "tab:gray", "aligned": "tab:blue", "per_layer": "tab:orange"}


@dataclass(frozen=True)
class Benchmark:
    """One script of the report: how to run it, and the JSON files it leaves under the outputs folder."""

    script: str
    files: tuple[str, ...]
    arguments: Callable[[Path], list[str]]

    def argv(self, outputs: Path) -> list[str]:
        return [self.script, *(str(argument) for argument in self.arguments(outputs))]

    def command(self, outputs: Path) -> str:
        """The command line as a reader would type it from the repository root."""
        return "python " + shlex.join(_shown(argument) for argument in self.argv(outputs))


def _sst2_checkpoint(outputs: Path, kind: str) -> Path:
    return outputs / "train_aligned" / kind


BENCHMARKS = {
    "train_aligned": Benchmark(
        "benchmarks/train_aligned.py",
        ("train_aligned/results.json",),
        lambda out: ["--output_dir", out / "train_aligned"],
    ),
    "similarity": Benchmark(
        "benchmarks/similarity.py",
        ("similarity/minilm_sst2.json", "similarity/synthetic.json"),
        lambda out: [
            "--output",
            out / "similarity",
            *("--standard", _sst2_checkpoint(out, "standard"), "--aligned", _sst2_checkpoint(out, "aligned")),
            *("--per-layer", _sst2_checkpoint(out, "per_layer")),
        ],
    ),
    "early_exit": Benchmark(
        "benchmarks/early_exit.py",
        ("early_exit.json",),
        lambda out: [
            *("--output", out / "early_exit.json"),
            *(
                "--sst2-aligned",
                _sst2_checkpoint(out, "aligned"),
                "--sst2-per-layer",
                _sst2_checkpoint(out, "per_layer"),
            ),
        ],
    ),
    "demo": Benchmark("examples/demo.py", ("demo/metrics.json",), lambda out: ["--output_dir", out / "demo"]),
    "saturation": Benchmark(
        "benchmarks/saturation.py",
        ("saturation/results.json",),
        lambda out: [
            *("--output", out / "saturation"),
            *(
                argument
                for kind in KINDS
                for argument in ("--checkpoint", f"sst2/{kind}={_shown(str(_sst2_checkpoint(out, kind)))}")
            ),
        ],
    ),
}


def _shown(argument: str) -> str:
    """A path inside the repository as a relative path, anything else as it is."""
    path = Path(argument)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else argument


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def run_benchmarks(names: Sequence[str], outputs: Path) -> None:
    """Runs the named benchmarks in order, each in its own process, recording each command, its wall time and the
    machine in `outputs/reproduce.json` (runs of benchmarks not named here are kept)."""
    path = outputs / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for name in names:
        benchmark = BENCHMARKS[name]
        print(f"\n>>> {benchmark.command(outputs)}", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, *benchmark.argv(outputs)], cwd=REPO, check=True)
        manifest[name] = {
            "command": benchmark.command(outputs),
            "wall_time_s": round(time.perf_counter() - started, 1),
            "machine": describe_machine(),
        }
        write_json(path, manifest)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the JSON
# ----------------------------------------------------------------------------------------------------------------------

# The keys each file must have for its section to render.
REQUIRED_KEYS = {
    "train_aligned/results.json": ("dev_accuracy_by_layer", "variants", "settings", "ratios", "targets_met"),
    "similarity/minilm_sst2.json": ("source", "num_samples", "models"),
    "similarity/synthetic.json": ("seconds", "speed_ratio", "max_abs_difference", "agreement"),
    "early_exit.json": ("torch_threads", "results"),
    "demo/metrics.json": ("standard", "aligned", "per-layer heads"),
    "saturation/results.json": ("runs", "results", "missing", "representation"),
}


def load_results(outputs: Path, allow_missing: bool = False) -> dict[str, dict | None]:
    """Reads every benchmark's JSON, keyed by its path under `outputs` (`None` for a missing one when allowed).

    Raises:
        FileNotFoundError: a file is missing and `allow_missing` is False; the message names the commands to run.
        ValueError: a file lacks keys the report reads (it was written by an older version of its script).
    """
    results, missing = {}, []
    for name, benchmark in BENCHMARKS.items():
        for file in benchmark.files:
            path = outputs / file
            if not path.exists():
                missing.append(f"  {path} (written by `{benchmark.command(outputs)}`)")
                results[file] = None
                continue
            payload = json.loads(path.read_text(encoding="utf-8"))
            absent = [key for key in REQUIRED_KEYS[file] if key not in payload]
            if absent:
                raise ValueError(
                    f"{path} has no {', '.join(map(repr, absent))}: it is not what the report expects from {name}; "
                    f"re-run `{benchmark.command(outputs)}`."
                )
            results[file] = payload
    if missing and not allow_missing:
        raise FileNotFoundError(
            "Benchmark results are missing:\n"
            + "\n".join(missing)
            + f"\nRun those commands (or `python benchmarks/reproduce.py --outputs {_shown(str(outputs))}` to run "
            "them all), or pass --allow-missing to render without them."
        )
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def draw_layer_accuracy(axis, curves: Mapping[str, Sequence[float]], title: str) -> None:
    """Accuracy of the classifier after every layer, one line per model kind."""
    for kind, values in curves.items():
        axis.plot(range(1, len(values) + 1), values, marker="o", color=COLORS[kind], label=KINDS[kind])
    axis.set_xlabel("exit after layer")
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()


def draw_tradeoff(axis, entries: Mapping[str, dict], title: str) -> None:
    """Accuracy against speedup over the threshold sweep, measured at batch 32 and ideal, one color per model kind."""
    from matplotlib.lines import Line2D

    for kind, entry in entries.items():
        sweep = sorted(entry["sweep"], key=lambda point: point["threshold"])
        accuracy = [point["accuracy"] for point in sweep]
        color = COLORS[kind]
        axis.plot([p["measured_speedup_batch32"] for p in sweep], accuracy, "o-", color=color, label=KINDS[kind])
        axis.plot([p["ideal_speedup"] for p in sweep], accuracy, ".--", color=color, alpha=0.6)
        for point in sweep:
            if point["calibrated"]:
                axis.plot(point["measured_speedup_batch32"], point["accuracy"], "*", color=color, markersize=14)
        axis.axhline(sweep[0]["full_accuracy"], color=color, linestyle=":", linewidth=1)
    styles = [
        Line2D([], [], color="black", marker="o", label="measured, batch 32"),
        Line2D([], [], color="black", linestyle="--", alpha=0.6, label="ideal, L / mean exit"),
        Line2D([], [], color="black", marker="*", markersize=10, linestyle="", label="calibrated threshold"),
        Line2D([], [], color="black", linestyle=":", linewidth=1, label="full depth"),
    ]
    axis.set_xlabel("speedup over full depth")
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(handles=[*axis.get_legend_handles_labels()[0], *styles], fontsize="small")


# ----------------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------------


def _missing(outputs: Path, benchmark: str, file: str) -> str:
    return f"_Not run yet: `{BENCHMARKS[benchmark].command(outputs)}` writes `{file}`._\n"


def _command(outputs: Path, manifest: dict, benchmark: str) -> str:
    """The command that produced a benchmark's JSON: as recorded when `reproduce.py` ran it, else the usual one."""
    return manifest[benchmark]["command"] if benchmark in manifest else BENCHMARKS[benchmark].command(outputs)


def _command_line(outputs: Path, manifest: dict, benchmark: str) -> str:
    return f"Command: `{_command(outputs, manifest, benchmark)}`\n"


def _intro(heading: str, claim: str, command: str = "") -> list[str]:
    """A section's heading, the claim it checks and, where one script backs the whole section, its command line."""
    return [f"## {heading}\n", f"Claim: {claim}\n", *([command] if command else [])]


def _layer_figure(curves: Mapping[str, Sequence[float]], title: str, path: Path) -> str:
    """Draws one layer-wise accuracy figure and returns the Markdown that shows it."""
    figure = _new_figure(6, 4)
    draw_layer_accuracy(figure.subplots(), curves, title)
    _save(figure, path)
    return f"![{title}: accuracy after every layer](figures/{path.name})\n"


def _exit_entries(exits: dict, task: str) -> dict[str, dict]:
    """The early-exit results of one task, by model kind."""
    return {kind: exits["results"][f"{task}/{kind}"] for kind in KINDS if f"{task}/{kind}" in exits["results"]}


def _layer_table(title: str, metrics_by_kind: Mapping[str, Mapping[str, float]]) -> str:
    """Per-layer accuracy of each kind (from `trainer.evaluate()` metrics) and each one's minimal depth."""
    columns = {kind: layer_values(metrics) for kind, metrics in metrics_by_kind.items()}
    num_layers = max(len(values) for values in columns.values())
    rows = [[layer, *(values[layer - 1] for values in columns.values())] for layer in range(1, num_layers + 1)]
    rows.append(["minimal depth", *(metrics.get("eval_minimal_depth", "-") for metrics in metrics_by_kind.values())])
    return print_table(title, ["layer", *(KINDS[kind] for kind in columns)], rows)


RECIPES_BLOCKS = (
    "recipes-accuracy-sst2",
    "recipes-accuracy-ag_news",
    "recipes-exits-sst2",
    "recipes-exits-ag_news",
    "recipes-targets",
)


def recipes_section(figures: Path) -> str:
    """Section 0: the recipes benchmark over seeds, rendered from its committed JSON (benchmarks/results/)."""
    text = _intro(
        "0. Aligned training over seeds: which recipe",
        "aligned training keeps the last layer as accurate as standard fine-tuning while making the middle layers "
        "usable, so that one classifier serves early exit. MiniLM with transformers' default optimization, one "
        "short epoch, three seeds per variant (mean ± std, accuracy in points); exits calibrated on held-out "
        "training data with one point of tolerated drop.",
    )
    text.append(
        "Command: `python benchmarks/recipes.py`, then `--phase speed` and `--phase render` "
        f"(JSON: `{RECIPES_RESULTS.relative_to(REPO)}`, committed).\n"
    )
    if not RECIPES_RESULTS.exists():
        return "\n".join([*text, "Not run yet.\n"])
    text += [f"<!-- BEGIN {name} -->\n<!-- END {name} -->\n" for name in RECIPES_BLOCKS]
    text.append(f"![Accuracy after every layer, mean ± std over seeds](figures/{RECIPES_FIGURE.name})\n")
    results = json.loads(RECIPES_RESULTS.read_text(encoding="utf-8"))
    draw_layers(results["summary"], figures / RECIPES_FIGURE.name)
    body = "\n".join(text)
    return replace_blocks(body, render_blocks(results))


ASR_BLOCKS = ("asr-accuracy-digits", "asr-accuracy-sst2", "asr-effects")


def asr_section() -> str:
    """Section 5: ASR scales trained and folded away, rendered from the ASR benchmark's committed JSON."""
    text = _intro(
        "5. ASR: folded channel scales",
        "(of the ASR paper, Zhong et al., arXiv 2304.06345) a constant per-channel scale on every block's attention "
        "and MLP outputs, learned through a small MLP from a learned constant input and folded into the output "
        "projections after training, improves accuracy at no inference cost. Checked here with standard and aligned "
        "training. "
        "Three seeds per row (mean ± std, accuracy in points); differences to the same training without ASR paired "
        "by seed; times in one process, one thread, alternating, best of N.",
    )
    results_path = asr_benchmark.RESULTS
    text.append(
        "Command: `python benchmarks/asr.py`, then `--phase timing` and `--phase render` "
        f"(JSON: `{results_path.relative_to(REPO)}`, committed). The SST-2 rows without ASR are the recipes "
        "benchmark's runs of the same settings and seeds (section 0).\n"
    )
    if not results_path.exists():
        return "\n".join([*text, "Not run yet.\n"])
    text += [f"<!-- BEGIN {name} -->\n<!-- END {name} -->\n" for name in ASR_BLOCKS]
    results = json.loads(results_path.read_text(encoding="utf-8"))
    return replace_blocks("\n".join(text), asr_benchmark.render_blocks(results))


def layerwise_section(results: dict, outputs: Path, figures: Path, manifest: dict) -> str:
    text = _intro(
        "1. Layer-wise accuracy: standard vs aligned vs per-layer heads",
        "with aligned training the model's own last-layer classifier works after every layer, far above "
        "standard fine-tuning at intermediate layers, with accuracy rising with depth; per-layer heads (one "
        "classifier per layer, same layer weights) are the usual multi-exit baseline. Each row is the accuracy of "
        "the classifier applied after that layer.",
    )
    text += ["### MiniLM on SST-2\n", _command_line(outputs, manifest, "train_aligned")]
    trained = results["train_aligned/results.json"]
    if trained is None:
        text.append(_missing(outputs, "train_aligned", "train_aligned/results.json"))
    else:
        settings = trained["settings"]
        variants = {kind: trained["variants"][kind]["eval"] for kind in KINDS}
        text.append(
            f"all-MiniLM-L6-v2 ({trained['pooling']} pooling) fine-tuned on {settings['train_samples']} "
            f"SST-2 training phrases (batch {settings['batch_size']}, learning rate {settings['learning_rate']}, "
            f"{settings['max_seq_length']} tokens, layer weights `{settings['aligned_layer_weights']}` for aligned and "
            "per-layer heads); accuracy on the SST-2 dev sentences.\n"
        )
        text.append(_layer_table("**SST-2 dev accuracy after every layer**", variants))
        text.append(
            _layer_figure(trained["dev_accuracy_by_layer"], "MiniLM on SST-2 dev", figures / "sst2_layer_accuracy.png")
        )
        text.append(
            print_table(
                "**Cost of aligned training, measured in the same run** (ratios of step time and memory)",
                ["ratio", "value"],
                [[f"`{name}`", value] for name, value in trained["ratios"].items()],
            )
        )
        text.append(
            print_table(
                "**The benchmark's own targets**",
                ["target", "met"],
                [[name, "yes" if met else "no"] for name, met in trained["targets_met"].items()],
            )
        )
    text += ["### Small ViT on digits\n", _command_line(outputs, manifest, "demo")]
    demo = results["demo/metrics.json"]
    if demo is None:
        text.append(_missing(outputs, "demo", "demo/metrics.json"))
    else:
        # The demo names its runs as the report does.
        metrics = {kind: demo[label] for kind, label in KINDS.items()}
        text.append(
            "The `make demo` ViT trained from scratch on scikit-learn's 8x8 digits, three ways; accuracy on its "
            "held-out images.\n"
        )
        text.append(_layer_table("**Digits held-out accuracy after every layer**", metrics))
        curves = {kind: layer_values(values) for kind, values in metrics.items()}
        text.append(_layer_figure(curves, "Small ViT on digits", figures / "digits_layer_accuracy.png"))
    return "\n".join(text)


def similarity_section(results: dict, outputs: Path, figures: Path, manifest: dict) -> str:
    text = _intro(
        "2. Layer similarity: COS vs CKA",
        "the sample-wise cosine similarity (COS) between layers' representations agrees with CKA (high rank "
        "correlation over layer pairs) and both fall with the distance between layers. Layer 0 is the embedding "
        "output; 'blocks only' leaves it out.",
        _command_line(outputs, manifest, "similarity"),
    )
    minilm = results["similarity/minilm_sst2.json"]
    if minilm is None:
        text.append(_missing(outputs, "similarity", "similarity/minilm_sst2.json"))
    else:
        models = minilm["models"]
        text.append(f"### MiniLM on SST-2 dev ({minilm['num_samples']} sentences)\n")
        text.append(f"Models: {minilm['source']}.\n")
        rows = [
            [
                KINDS[kind],
                entry["agreement"]["spearman"],
                entry["agreement"]["pearson"],
                entry["agreement_blocks"]["spearman"],
                entry["off_diagonal_mean"]["cos"],
                entry["off_diagonal_mean"]["cka"],
            ]
            for kind, entry in models.items()
        ]
        text.append(
            print_table(
                "**Agreement of the COS and CKA matrices, and mean off-diagonal similarity**",
                ["model", "Spearman", "Pearson", "Spearman (blocks only)", "mean COS", "mean CKA"],
                rows,
            )
        )
        num_blocks = len(next(iter(models.values()))["similarity_to_last_block"]["cos"])
        rows = [
            [KINDS[kind], measure.upper(), *entry["similarity_to_last_block"][measure]]
            for kind, entry in models.items()
            for measure in ("cos", "cka")
        ]
        text.append(
            print_table(
                "**Similarity of each block to the last block**",
                ["model", "measure", *(f"layer {layer}" for layer in range(1, num_blocks + 1))],
                rows,
            )
        )
        for name, alt in (("minilm_sst2_similarity.png", "COS and CKA heatmaps"), ("minilm_sst2_accuracy.png", "")):
            source = outputs / "similarity" / name
            if source.exists():
                shutil.copyfile(source, figures / name)
                text.append(f"![{alt or 'Classifier and linear-probe accuracy per layer'}](figures/{name})\n")
    synthetic = results["similarity/synthetic.json"]
    if synthetic is None:
        text.append(_missing(outputs, "similarity", "similarity/synthetic.json"))
    else:
        text.append(
            f"### Synthetic residual stream ({synthetic['num_representations']} representations, "
            f"{synthetic['num_samples']} samples, width {synthetic['hidden_size']}, {synthetic['device']})\n"
        )
        text.append(
            f"COS-CKA agreement: Spearman {synthetic['agreement']['spearman']:.3f}, Pearson "
            f"{synthetic['agreement']['pearson']:.3f} over {synthetic['agreement']['num_pairs']} layer pairs.\n"
        )
        seconds = synthetic["seconds"]
        rows = [
            [
                measure.upper(),
                seconds[f"hf_aligned_{measure}"],
                seconds[f"naive_numpy_{measure}"],
                synthetic["speed_ratio"][measure],
                f"{synthetic['max_abs_difference'][measure]:.1e}",
            ]
            for measure in ("cos", "cka")
        ]
        text.append(
            print_table(
                "**hf_aligned's similarity matrices against a naive per-pair numpy loop**",
                ["matrix", "hf_aligned (s)", "naive numpy (s)", "speed ratio", "max abs difference"],
                rows,
            )
        )
    return "\n".join(text)


def early_exit_section(results: dict, outputs: Path, figures: Path, manifest: dict) -> str:
    text = _intro(
        "3. Multi-exit: one shared classifier vs per-layer heads",
        "served with early exit, the aligned model's single classifier is on par with the standard multi-exit "
        "model that trains one classifier per layer. Confidence rule (exit when the top softmax probability reaches "
        "the threshold); the calibrated threshold is chosen on validation data by `calibrate_exits` (at most 1 "
        "point below full depth), accuracy is on the test set; ideal speedup = L / mean exit layer, measured "
        "speedup = wall time of the full forward ÷ wall time of `early_exit_predict`.",
        _command_line(outputs, manifest, "early_exit"),
    )
    exits = results["early_exit.json"]
    if exits is None:
        text.append(_missing(outputs, "early_exit", "early_exit.json"))
        return "\n".join(text)
    text.append(f"torch threads: {exits['torch_threads']}.\n")
    tasks = [task for task in EXIT_TASKS if any(key.startswith(f"{task}/") for key in exits["results"])]
    absent = [task for task in EXIT_TASKS if task not in tasks]
    if absent:
        text.append(f"_Tasks not in this run: {', '.join(absent)}._\n")
    rows = []
    for task in tasks:
        for kind in ("aligned", "per_layer"):
            entry = exits["results"].get(f"{task}/{kind}")
            if entry is None:
                continue
            point = next(point for point in entry["sweep"] if point["calibrated"])
            rows.append(
                [
                    task,
                    KINDS[kind],
                    point["full_accuracy"],
                    point["threshold"],
                    point["accuracy"],
                    point["mean_exit_layer"],
                    point["ideal_speedup"],
                    point["measured_speedup_batch1"],
                    point["measured_speedup_batch32"],
                ]
            )
    text.append(
        print_table(
            "**At the calibrated threshold**",
            [
                "task",
                "model",
                "full depth",
                "threshold",
                "accuracy",
                "mean exit",
                "ideal x",
                "measured x b1",
                "measured x b32",
            ],
            rows,
        )
    )
    figure = _new_figure(6 * len(tasks), 4.5)
    for axis, task in zip(figure.subplots(1, len(tasks), squeeze=False)[0], tasks):
        draw_tradeoff(axis, _exit_entries(exits, task), task)
    _save(figure, figures / "early_exit_tradeoff.png")
    text.append("![Accuracy against speedup](figures/early_exit_tradeoff.png)\n")
    text.append("<details><summary>Every threshold of the sweep</summary>\n")
    for name, entry in exits["results"].items():
        text.append(
            print_table(
                f"**{name}** (L = {entry['calibration']['num_layers']})",
                ["threshold", "accuracy", "mean exit", "ideal x", "measured x b1", "measured x b32", "calibrated"],
                [
                    [
                        point["threshold"],
                        point["accuracy"],
                        point["mean_exit_layer"],
                        point["ideal_speedup"],
                        point["measured_speedup_batch1"],
                        point["measured_speedup_batch32"],
                        "yes" if point["calibrated"] else "",
                    ]
                    for point in entry["sweep"]
                ],
            )
        )
    text.append("</details>\n")
    return "\n".join(text)


SATURATION_TASKS = {
    "sst2": "MiniLM on SST-2 dev",
    "ag_news": "MiniLM on AG News (the 1,600-item test part)",
    "digits": "Small ViT on digits (360 held-out images)",
}


def _spread(values: Sequence[float]) -> str:
    """Mean ± standard deviation over seeds (the value alone for one seed)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def _mean_lists(lists: Sequence[Sequence[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*lists)]


def _saturation_verdicts(by_kind: dict[str, list[dict]]) -> list[str]:
    """Whether claims 5 and 4 hold on one task, from its entries by model kind (each a list over seeds)."""
    lines = []
    standard = {entry["seed"]: entry for entry in by_kind.get("standard", [])}
    aligned = {entry["seed"]: entry for entry in by_kind.get("aligned", [])}
    seeds = sorted(set(standard) & set(aligned))
    if not seeds:
        lines.append("- Claim 5 cannot be judged: it needs the standard and the aligned model of the same seed.\n")
    else:
        earlier = [aligned[seed]["saturation"]["mean"] < standard[seed]["saturation"]["mean"] for seed in seeds]
        verdict = "holds" if all(earlier) else "does not hold" if not any(earlier) else "is mixed"
        caveat = " (one seed: indicative only)" if len(seeds) == 1 else ""
        lines.append(
            f"- Claim 5 (aligned training saturates earlier) **{verdict}** here{caveat}: mean saturation layer "
            f"{_spread([aligned[seed]['saturation']['mean'] for seed in seeds])} aligned vs "
            f"{_spread([standard[seed]['saturation']['mean'] for seed in seeds])} standard, earlier in "
            f"{sum(earlier)} of {len(seeds)} seed(s).\n"
        )
    for kind in ("standard", "aligned"):
        entries = by_kind.get(kind, [])
        if not entries:
            continue
        correlations = [entry["probability_similarity"]["last_class"]["spearman"] for entry in entries]
        verdict = "holds" if all(value > 0 for value in correlations) else "does not hold"
        lines.append(
            f"- Claim 4 on the {KINDS[kind]} model **{verdict}**: Spearman of cos(f_l, f_L) and the probability "
            f"of the last layer's class over layers 1..L-1 and samples is {_spread(correlations)} "
            f"({len(entries)} seed(s)).\n"
        )
    return lines


def _saturation_figure(by_kind: dict[str, list[dict]], title: str, path: Path) -> str:
    """Share saturated by each layer, and mean probability against mean similarity per layer, from the JSON."""
    figure = _new_figure(11, 4)
    saturated, relation = figure.subplots(1, 2)
    for kind, entries in by_kind.items():
        by_layer = _mean_lists([entry["saturation"]["saturated_by"] for entry in entries])
        saturated.plot(range(1, len(by_layer) + 1), by_layer, marker="o", color=COLORS[kind], label=KINDS[kind])
        cosine = _mean_lists([entry["probability_similarity"]["mean_cosine"] for entry in entries])
        probability = _mean_lists(
            [entry["probability_similarity"]["mean_last_class_probability"] for entry in entries]
        )
        relation.plot(cosine, probability, marker="o", color=COLORS[kind], label=KINDS[kind])
    saturated.set_xlabel("layer l")
    saturated.set_ylabel("share of samples saturated by l")
    saturated.set_title(f"{title}: saturation")
    relation.set_xlabel("mean cos(f_l(x), f_L(x))")
    relation.set_ylabel("mean p(last layer's class) at l")
    relation.set_title(f"{title}: one point per layer")
    for axis in (saturated, relation):
        axis.grid(alpha=0.3)
        axis.legend()
    _save(figure, path)
    return f"![{title}: saturation and probability against similarity](figures/{path.name})\n"


def _saturation_tables(task: str, by_kind: dict[str, list[dict]]) -> list[str]:
    rows = []
    for kind, entries in by_kind.items():
        similarity = [entry["probability_similarity"] for entry in entries]
        rows.append(
            [
                KINDS[kind],
                len(entries),
                _spread([entry["layer_accuracy"][-1] for entry in entries]),
                _spread([entry["saturation"]["mean"] for entry in entries]),
                _spread([entry["saturation"]["saturated_by"][0] for entry in entries]),
                _spread([value["last_class"]["spearman"] for value in similarity]),
                _spread([value["true_class"]["spearman"] for value in similarity]),
                _spread([value["last_class"]["spearman_of_layer_means"] for value in similarity]),
            ]
        )
    summary = print_table(
        f"**{task}: saturation and rank correlation of probability with similarity to the last layer**",
        [
            "model",
            "seeds",
            "accuracy (last layer)",
            "mean saturation layer",
            "saturated by layer 1",
            "Spearman, p(last class)",
            "Spearman, p(true class)",
            "Spearman of layer means",
        ],
        rows,
    )
    num_layers = max(len(entries[0]["saturation"]["saturated_by"]) for entries in by_kind.values())
    shares = print_table(
        f"**{task}: share of samples saturated by each layer** (mean over seeds)",
        ["model", *(f"layer {layer}" for layer in range(1, num_layers + 1))],
        [
            [KINDS[kind], *_mean_lists([entry["saturation"]["saturated_by"] for entry in entries])]
            for kind, entries in by_kind.items()
        ],
    )
    within = print_table(
        f"**{task}: Spearman within each layer** (over samples, p(last class); mean over seeds)",
        ["model", *(f"layer {layer}" for layer in range(1, num_layers))],
        [
            [
                KINDS[kind],
                *_mean_lists(
                    [entry["probability_similarity"]["last_class"]["spearman_within_layer"] for entry in entries]
                ),
            ]
            for kind, entries in by_kind.items()
        ],
    )
    return [summary, shares, within]


def saturation_section(results: dict, outputs: Path, figures: Path, manifest: dict) -> str:
    text = _intro(
        "4. Saturation events and probability vs similarity",
        "(the ICLR version's claims 4 and 5) the more similar layer l is to the last layer, the higher the "
        "probability the last-layer classifier gives (at l) to the last layer's class; and aligned training brings "
        "more early saturation events.",
    )
    text.append(
        "A sample's *saturation layer* is the first layer from which the classifier's top-1 prediction stays the "
        "same up to the last layer L (L when it still changes at L). Early exit's patience rule (leave once the "
        "prediction has held for p more layers) is its online cousin: a sample saturated at s has left by layer "
        "min(s + p, L), with the full-depth answer whenever it leaves at or after s. f_l(x) is "
        "`pooled_layer_states`: block l's "
        "hidden states pooled with the model's pooling, *before* the classifier's final norm and pooler. The "
        "Spearman correlations pool every sample of layers 1..L-1 (the last layer, at cosine 1, is left out); "
        "'of layer means' correlates the L per-layer means. For per-layer heads the classifier at l is head l, "
        "not the last layer's: the claims concern the standard and aligned models, heads are shown for reference. "
        "Accuracy claims need 3 seeds; a single seed is marked as such.\n"
    )
    payload = results["saturation/results.json"]
    if payload is None:
        text.append(_missing(outputs, "saturation", "saturation/results.json"))
        return "\n".join(text)
    runs = payload["runs"]
    commands = list(dict.fromkeys(run["command"] for run in runs))
    text.append(
        f"Commands (the script resumes, measuring only what is new): {', '.join(f'`{c}`' for c in commands)}; "
        f"{len(runs)} invocation(s) totalling {sum(run.get('duration_s', 0) for run in runs) / 60:.1f} min, the last "
        f"at commit {runs[-1]['machine']['commit']} on {runs[-1]['machine']['cpu']} "
        f"({runs[-1]['torch_threads']} torch thread(s)).\n"
    )
    settings = payload.get("settings", {})
    if settings:
        text.append(
            f"Data: {'; '.join(f'{task}: {data}' for task, data in settings['data'].items())}. Digits models: "
            f"{settings['digits_model']}, {settings['digits_training']}. Text: the checkpoints given, "
            f"{settings['text_max_length']} tokens.\n"
        )
    for task, title in SATURATION_TASKS.items():
        text.append(f"### {title}\n")
        entries = sorted(
            (entry for entry in payload["results"].values() if entry["task"] == task), key=lambda e: e["seed"]
        )
        if not entries:
            tried = [path for key, paths in payload["missing"].items() if key.startswith(f"{task}/") for path in paths]
            reason = (
                f"no {task} checkpoint was found (looked in {', '.join(f'`{path}`' for path in tried)})"
                if tried
                else f"{task} was not among the tasks run"
            )
            text.append(
                f"_Not measured yet: {reason}. Claims 4 and 5 cannot be judged on {task} until "
                "`benchmarks/saturation.py` runs on its checkpoints._\n"
            )
            continue
        by_kind = {kind: [entry for entry in entries if entry["variant"] == kind] for kind in KINDS}
        by_kind = {kind: found for kind, found in by_kind.items() if found}
        absent = [KINDS[kind] for kind in KINDS if kind not in by_kind]
        if absent:
            text.append(f"_No checkpoint measured for: {', '.join(absent)}._\n")
        text += _saturation_tables(task, by_kind)
        text += _saturation_verdicts(by_kind)
        text.append(_saturation_figure(by_kind, task, figures / f"{task}_saturation.png"))
        scatter = outputs / "saturation" / f"{task}_probability_similarity.png"
        if scatter.exists():
            shutil.copyfile(scatter, figures / scatter.name)
            text.append(f"![{task}: per-sample probability against similarity, first seed](figures/{scatter.name})\n")
    return "\n".join(text)


def draw_headline(results: dict, path: Path) -> bool:
    """SST-2 layer-wise accuracy next to the accuracy/speedup trade-off of the first exit task run; False if neither
    was run."""
    trained, exits = results["train_aligned/results.json"], results["early_exit.json"]
    panels = []
    if trained is not None:
        curves = trained["dev_accuracy_by_layer"]
        panels.append(lambda axis: draw_layer_accuracy(axis, curves, "MiniLM on SST-2: accuracy after every layer"))
    task = next((task for task in EXIT_TASKS if exits and f"{task}/aligned" in exits["results"]), None)
    if task is not None:
        entries = _exit_entries(exits, task)
        panels.append(lambda axis: draw_tradeoff(axis, entries, f"{task}: early exit"))
    if not panels:
        return False
    figure = _new_figure(6.5 * len(panels), 4.5)
    for axis, draw in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        draw(axis)
    _save(figure, path)
    return True


def provenance(manifest: dict) -> str:
    """The date, commit and machine lines: the machine of every benchmark `reproduce.py` ran (the benchmarks' own
    JSON does not record it), else the machine rendering the report."""
    rendered = describe_machine()
    machines: dict[str, list[str]] = {}
    for name, run in manifest.items():
        machine = run["machine"]
        machines.setdefault(f"{machine['cpu']}; GPU: {machine['gpu']}; {machine['software']}", []).append(name)
    lines = [f"Rendered {rendered['date']} at commit {rendered['commit']}.\n"]
    lines += [f"- Run by `reproduce.py` on {machine}: {', '.join(names)}.\n" for machine, names in machines.items()]
    if len(manifest) < len(BENCHMARKS):
        lines.append(
            "- No machine on record for benchmarks run on their own; this report was rendered on "
            f"{rendered['cpu']}; GPU: {rendered['gpu']}; {rendered['software']}.\n"
        )
    return "".join(lines)


def sources_section(results: dict, outputs: Path, manifest: dict) -> str:
    """Each JSON file read, the command that writes it, when it was written and how long its run took."""
    rows = []
    for name, benchmark in BENCHMARKS.items():
        for file in benchmark.files:
            written = "not run"
            if results[file] is not None:
                written = (
                    f"{datetime.fromtimestamp((outputs / file).stat().st_mtime, timezone.utc):%Y-%m-%d %H:%M} UTC"
                )
            wall_time = f"{manifest[name]['wall_time_s'] / 60:.1f} min" if name in manifest else "-"
            rows.append([f"`{file}`", f"`{_command(outputs, manifest, name)}`", written, wall_time])
    return "## Sources\n" + print_table(
        f"JSON read from `{_shown(str(outputs))}`", ["JSON", "command", "written", "wall time"], rows
    )


def render(outputs: Path = OUTPUTS, docs: Path = DOCS, allow_missing: bool = False) -> Path:
    """Writes `docs/results.md` and `docs/figures/*.png` from the benchmarks' JSON under `outputs`.

    Args:
        outputs: the folder the benchmarks wrote to.
        docs: where results.md and figures/ go (figures/ is emptied of PNGs first: it is all generated).
        allow_missing: render the sections of missing benchmarks as "not run yet" instead of failing.

    Returns:
        The path of results.md.
    """
    results = load_results(outputs, allow_missing)
    manifest_path = outputs / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):
        stale.unlink()
    text = [
        "# Reproduction report\n",
        "<!-- Generated by benchmarks/reproduce.py from the benchmarks' JSON: edit that script, not this file. -->\n",
        "The claims of *On Layer-wise Representation Similarity: Application for Multi-Exit Models with a Single "
        "Classifier* (Jiang, Zhou, Zhu, arXiv 2406.14479) checked on the real data here. Regenerate with "
        "`python benchmarks/reproduce.py` (runs every benchmark) or `python benchmarks/reproduce.py --render-only` "
        "(re-renders from `outputs/benchmarks/`).\n",
        provenance(manifest),
    ]
    if draw_headline(results, figures / "headline.png"):
        text.append("![Headline: layer-wise accuracy and early-exit trade-off](figures/headline.png)\n")
    text += [
        recipes_section(figures),
        layerwise_section(results, outputs, figures, manifest),
        similarity_section(results, outputs, figures, manifest),
        early_exit_section(results, outputs, figures, manifest),
        saturation_section(results, outputs, figures, manifest),
        asr_section(),
        sources_section(results, outputs, manifest),
    ]
    path = docs / "results.md"
    path.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render-only", action="store_true", help="Render from existing JSON; run nothing.")
    parser.add_argument("--outputs", type=Path, default=OUTPUTS, help="Where the benchmarks write (and are read).")
    parser.add_argument("--docs", type=Path, default=DOCS, help="Where results.md and figures/ are written.")
    parser.add_argument(
        "--benchmarks", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS), help="Which ones to run."
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="Render missing benchmarks as 'not run yet' instead of failing."
    )
    args = parser.parse_args(argv)
    outputs = args.outputs.resolve()
    if not args.render_only:
        run_benchmarks(args.benchmarks, outputs)
    try:
        render(outputs, args.docs, args.allow_missing)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
