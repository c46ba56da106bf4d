"""Reproduction report: docs/results.md rendered from the benchmark JSON committed under benchmarks/results/.

The claims (Jiang, Zhou, Zhu, arXiv 2406.14479), each checked on the real data here:
1. aligned training makes the last layer's classifier work after every layer (standard fine-tuning, the paper's loss,
   the library's default recipe, per-layer heads; MiniLM on SST-2 and AG News, three seeds: `benchmarks/recipes.py`);
2. sample-wise cosine similarity (COS) agrees with CKA across layers (`benchmarks/similarity.py`, on the recipes
   benchmark's SST-2 checkpoints and on a synthetic 12-block residual stream);
3. as a multi-exit model, the single classifier is on par with one classifier per layer: calibrated exits and their
   measured speed-up (`benchmarks/recipes.py --phase speed`);
4. (ICLR version) probability of the last layer's class rises with similarity to the last layer, and aligned training
   saturates earlier (`benchmarks/saturation.py`);
5. exits calibrated with a statistical guarantee keep it over many calibration draws (`benchmarks/calibration.py`).

The report is a registry of sections, `SECTIONS`: each names its committed JSON (under benchmarks/results/), the
commands that write it, and a render function returning the section's Markdown blocks by name. `render` writes each
section's heading, claim and JSON path, then every block between `<!-- BEGIN name -->` / `<!-- END name -->`
markers (the markers of recipes.py's `replace_blocks`, so a benchmark's own render step fills the same blocks), and
last a Sources table built from the provenance each JSON records (command, seeds, commit, machine, duration). Nothing
is read from outside benchmarks/results/ and nothing depends on when or where the report is rendered, so
tests/test_reproduce.py re-renders it and requires the committed docs/results.md, byte for byte. A block found in
docs/results.md that no section renders is an error, never silently dropped.

Adding a benchmark's section (one entry): commit its JSON under benchmarks/results/, give the script a
`render_blocks(results: dict) -> dict[str, str]` (as recipes.py does), and append to `SECTIONS`

    "my_benchmark": Section(
        title="What it measures",
        claim="what the section checks, and how",
        files={"my_benchmark.json": ()},                   # file -> keys the renderer reads (checked first)
        commands=("python benchmarks/my_benchmark.py",),   # writes the JSON; run by `reproduce.py` without --render-only
        render=module_blocks("my_benchmark", "my_benchmark.json"),  # benchmarks/my_benchmark.py's render_blocks
    ),

then run `python benchmarks/reproduce.py --render-only` and commit docs/results.md. The JSON records its provenance
as a top-level `"provenance"` object (or list of them) with the keys `command`, `seeds`, `commit`, `machine` and
`duration_s` (see similarity.py); a benchmark with another layout passes its own `provenance=` reader.

    python benchmarks/reproduce.py --render-only        # re-render docs/results.md and its figures from the JSON
    flock /tmp/hf_aligned_cpu.lock python benchmarks/reproduce.py   # run every section's commands first (hours)
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, print_table
from recipes import FIGURE as RECIPES_FIGURE
from recipes import draw_layers, render_blocks
from similarity import draw as draw_similarity

RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"
# Model kinds, as the benchmarks name them, -> how the report names them.
KINDS = {"standard": "standard", "aligned": "aligned", "per_layer": "per-layer heads"}
COLORS = {"standard": "tab:gray", "aligned": "tab:blue", "per_layer": "tab:orange"}
BLOCK = re.compile(r"<!-- BEGIN (\S+) -->")

Blocks = dict[str, str]
Render = Callable[[Mapping[str, dict], Path], Blocks]


# ----------------------------------------------------------------------------------------------------------------------
# Provenance: what each JSON records about the runs that wrote it
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Provenance:
    """The runs behind one JSON file: distinct commands, seeds, commits and machines, and the summed duration of
    the runs that recorded one (`unrecorded`: how many did not)."""

    commands: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    machines: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    runs: int = 0
    unrecorded: int = 0

    def add(
        self,
        command: str | None = None,
        seeds: Sequence[int] = (),
        commit: str | None = None,
        machine: str | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Records one run (None: the JSON does not say)."""
        self.runs += 1
        for values, value in ((self.commands, command), (self.commits, commit), (self.machines, machine)):
            if value is not None and value not in values:
                values.append(value)
        self.seeds = sorted({*self.seeds, *seeds})
        if duration_s is None:
            self.unrecorded += 1
        else:
            self.duration_s += duration_s

    def cells(self) -> list[str]:
        """Table cells: commands, seeds, commits, machines, duration ("not recorded" where the JSON is silent)."""
        missing = "not recorded"

        def listed(values: list, quote: bool = False) -> str:
            return "<br>".join(f"`{value}`" if quote else str(value) for value in values) or missing

        duration = missing
        if self.runs > self.unrecorded:
            duration = f"{self.duration_s / 60:.1f} min over {self.runs - self.unrecorded} run(s)"
            if self.unrecorded:
                duration += f" ({self.unrecorded} more not recorded)"
        seeds = ", ".join(map(str, self.seeds)) or missing
        return [listed(self.commands, quote=True), seeds, listed(self.commits), listed(self.machines), duration]


def recorded_provenance(payload: dict) -> Provenance:
    """The conventional layout: a top-level `provenance` object, or list of them, with `command`, `seeds`, `commit`,
    `machine` and `duration_s`."""
    records = payload.get("provenance", [])
    provenance = Provenance()
    for record in [records] if isinstance(records, dict) else records:
        provenance.add(
            record.get("command"),
            record.get("seeds", ()),
            record.get("commit"),
            record.get("machine"),
            record.get("duration_s"),
        )
    return provenance


def recipes_provenance(payload: dict) -> Provenance:
    """recipes.json: every training run and every speed measurement records its own provenance."""
    provenance = Provenance()
    for run in payload["runs"].values():
        _add_run(provenance, run)
        if run.get("speed", {}).get("provenance") is not None:
            _add_run(provenance, {**run["speed"], "seed": run["seed"]})
    return provenance


def tables_provenance(*tables: str) -> Callable[[dict], Provenance]:
    """A reader for JSON whose tables hold runs that each record `provenance` (recipes.py's `provenance()`) and,
    where they have them, a `seed` and a `wall_time_s`, as the projection-head and ASR benchmarks write them."""

    def read(payload: dict) -> Provenance:
        provenance = Provenance()
        for table in tables:
            for run in payload.get(table, {}).values():
                _add_run(provenance, run)
        return provenance

    return read


def _add_run(provenance: Provenance, run: dict) -> None:
    record = run["provenance"]
    machine = f"{record['machine']}, Python {record['python']}"
    seeds = [run["seed"]] if "seed" in run else []
    provenance.add(record["command"], seeds, record["commit"][:7], machine, run.get("wall_time_s"))


def saturation_provenance(payload: dict) -> Provenance:
    """saturation/results.json: a list of invocations (command, machine, duration), the seed on every result."""
    provenance = Provenance()
    for run in payload["runs"]:
        machine = run["machine"]
        provenance.add(
            run["command"],
            (),
            machine["commit"],
            f"{machine['cpu']}, {run['torch_threads']} torch thread(s); {machine['software']}",
            run.get("duration_s"),
        )
    provenance.seeds = sorted({entry["seed"] for entry in payload["results"].values()})
    return provenance


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One section of the report.

    Args:
        title: its heading (the report numbers the sections in registry order).
        claim: the prose under the heading: what the section checks and how.
        files: each JSON file it reads, relative to benchmarks/results/, with the top-level keys its renderer needs.
        commands: the commands that write those files, as run from the repository root.
        render: `(payloads by file, figures folder) -> blocks by name`; it draws its figures into the folder and
            links them as `figures/<name>.png`.
        provenance: reads a file's runs (command, seeds, commit, machine, duration) for the Sources table.
    """

    title: str
    claim: str
    files: Mapping[str, tuple[str, ...]]
    commands: tuple[str, ...]
    render: Render
    provenance: Callable[[dict], Provenance] = recorded_provenance


def module_blocks(script: str, file: str) -> Render:
    """A section renderer calling `render_blocks(results)` of benchmarks/<script>.py on the JSON `file`."""

    def render(payloads: Mapping[str, dict], figures: Path) -> Blocks:
        return importlib.import_module(script).render_blocks(payloads[file])

    return render


# ----------------------------------------------------------------------------------------------------------------------
# Sections 1 and 3: the recipes benchmark
# ----------------------------------------------------------------------------------------------------------------------


def layers_blocks(payloads: Mapping[str, dict], figures: Path) -> Blocks:
    """Accuracy after every layer per recipe and task (mean ± std over seeds), and the figure of it."""
    results = payloads["recipes.json"]
    draw_layers(results["summary"], figures / RECIPES_FIGURE.name)
    blocks = {name: body for name, body in render_blocks(results).items() if name.startswith("recipes-accuracy-")}
    blocks["report-layers-figure"] = (
        f"![Accuracy after every layer, mean ± std over seeds](figures/{RECIPES_FIGURE.name})"
    )
    return blocks


def exits_blocks(payloads: Mapping[str, dict], figures: Path) -> Blocks:
    """Calibrated early exit and training cost per recipe and task, then the targets, met or missed."""
    blocks = render_blocks(payloads["recipes.json"])
    exits = {name: body for name, body in blocks.items() if name.startswith("recipes-exits-")}
    return {**exits, "recipes-targets": blocks["recipes-targets"]}


# ----------------------------------------------------------------------------------------------------------------------
# Section 2: similarity
# ----------------------------------------------------------------------------------------------------------------------


def similarity_blocks(payloads: Mapping[str, dict], figures: Path) -> Blocks:
    """COS-CKA agreement and similarity to the last block on MiniLM, and exactness and speed on synthetic data."""
    minilm, synthetic = payloads["similarity/minilm_sst2.json"], payloads["similarity/synthetic.json"]
    models = minilm["models"]
    agreement = print_table(
        "**Agreement of the COS and CKA matrices, and mean off-diagonal similarity**",
        ["model", "Spearman", "Pearson", "Spearman (blocks only)", "mean COS", "mean CKA"],
        [
            [
                KINDS[kind],
                entry["agreement"]["spearman"],
                entry["agreement"]["pearson"],
                entry["agreement_blocks"]["spearman"],
                entry["off_diagonal_mean"]["cos"],
                entry["off_diagonal_mean"]["cka"],
            ]
            for kind, entry in models.items()
        ],
    )
    num_blocks = len(next(iter(models.values()))["similarity_to_last_block"]["cos"])
    to_last = print_table(
        "**Similarity of each block to the last block**",
        ["model", "measure", *(f"layer {layer}" for layer in range(1, num_blocks + 1))],
        [
            [KINDS[kind], measure.upper(), *entry["similarity_to_last_block"][measure]]
            for kind, entry in models.items()
            for measure in ("cos", "cka")
        ],
    )
    heatmaps, accuracy = draw_similarity(minilm, figures)
    seconds = synthetic["seconds"]
    speed = print_table(
        "**hf_aligned's similarity matrices against a naive per-pair numpy loop**",
        ["matrix", "hf_aligned (s)", "naive numpy (s)", "speed ratio", "max abs difference"],
        [
            [
                measure.upper(),
                seconds[f"hf_aligned_{measure}"],
                seconds[f"naive_numpy_{measure}"],
                synthetic["speed_ratio"][measure],
                f"{synthetic['max_abs_difference'][measure]:.1e}",
            ]
            for measure in ("cos", "cka")
        ],
    )
    return {
        "similarity-minilm": "\n".join(
            [
                f"### MiniLM on SST-2 dev ({minilm['num_samples']} sentences)\n",
                f"Models: {minilm['source']}.",
                agreement,
                to_last,
                f"![COS and CKA heatmaps](figures/{heatmaps.name})\n",
                f"![Classifier and linear-probe accuracy per layer](figures/{accuracy.name})",
            ]
        ),
        "similarity-synthetic": "\n".join(
            [
                f"### Synthetic residual stream ({synthetic['num_representations']} representations, "
                f"{synthetic['num_samples']} samples, width {synthetic['hidden_size']}, {synthetic['device']})\n",
                f"COS-CKA agreement: Spearman {synthetic['agreement']['spearman']:.3f}, Pearson "
                f"{synthetic['agreement']['pearson']:.3f} over {synthetic['agreement']['num_pairs']} layer pairs.",
                speed,
            ]
        ),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Section 4: saturation
# ----------------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


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


def saturation_blocks(payloads: Mapping[str, dict], figures: Path) -> Blocks:
    """Per task: saturation and probability-similarity tables over seeds, the verdicts on claims 4 and 5, a figure."""
    payload = payloads["saturation/results.json"]
    settings = payload["settings"]
    blocks = {
        "saturation-data": (
            f"Data: {'; '.join(f'{task}: {data}' for task, data in settings['data'].items())}. Digits models: "
            f"{settings['digits_model']}, {settings['digits_training']}. Text: the checkpoints of the Sources "
            f"table's commands, {settings['text_max_length']} tokens."
        )
    }
    for task, title in SATURATION_TASKS.items():
        text = [f"### {title}\n"]
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
                "`benchmarks/saturation.py` runs on its checkpoints._"
            )
            blocks[f"saturation-{task}"] = "\n".join(text)
            continue
        by_kind = {kind: [entry for entry in entries if entry["variant"] == kind] for kind in KINDS}
        by_kind = {kind: found for kind, found in by_kind.items() if found}
        absent = [KINDS[kind] for kind in KINDS if kind not in by_kind]
        if absent:
            text.append(f"_No checkpoint measured for: {', '.join(absent)}._\n")
        text += _saturation_tables(task, by_kind)
        text += _saturation_verdicts(by_kind)
        text.append(_saturation_figure(by_kind, task, figures / f"{task}_saturation.png"))
        blocks[f"saturation-{task}"] = "\n".join(text)
    return blocks


# What sections 1 and 3 share: the recipes benchmark's JSON, commands and provenance reader.
RECIPES = {
    "files": {"recipes.json": ("runs", "summary", "targets")},
    "commands": ("python benchmarks/recipes.py", "python benchmarks/recipes.py --phase speed"),
    "provenance": recipes_provenance,
}
SECTIONS: dict[str, Section] = {
    "layers": Section(
        title="Layer-wise accuracy: standard vs aligned vs per-layer heads",
        claim="with aligned training the model's own last-layer classifier works after every layer, far above "
        "standard fine-tuning at intermediate layers, with accuracy rising with depth; per-layer heads (one "
        "classifier per layer) are the usual multi-exit baseline. MiniLM fine-tuned with transformers' default "
        "optimization for one short epoch, each recipe over the seeds its row counts; each cell is the accuracy of "
        "the classifier applied after that layer, in points, mean ± std over seeds.",
        render=layers_blocks,
        **RECIPES,
    ),
    "similarity": Section(
        title="Layer similarity: COS vs CKA",
        claim="the sample-wise cosine similarity (COS) between layers' representations agrees with CKA (high rank "
        "correlation over layer pairs) and both fall with the distance between layers. Layer 0 is the embedding "
        "output; 'blocks only' leaves it out. One checkpoint per model (no accuracy claim is made here).",
        files={
            "similarity/minilm_sst2.json": ("source", "num_samples", "models"),
            "similarity/synthetic.json": ("seconds", "speed_ratio", "max_abs_difference", "agreement"),
        },
        commands=("python benchmarks/similarity.py",),
        render=similarity_blocks,
    ),
    "multi_exit": Section(
        title="Multi-exit: one shared classifier vs per-layer heads",
        claim="served with early exit, the aligned model's single classifier is on par with the multi-exit model "
        "that trains one classifier per layer. Confidence rule; the threshold is calibrated by `calibrate_exits(method='empirical')` (the old rule, no "
        "guarantee: see the calibration section) on "
        "held-out training data (at most 1 point below full depth), then applied to the evaluation split; measured "
        "speed-up = wall time of the full forward ÷ wall time of `early_exit_predict` at batch 32 (best of three, "
        "alternated in one process); step time and peak memory against standard fine-tuning of the same seed. "
        "Mean ± std over seeds. The targets are those of the library's default recipe; why the missed ones are "
        "missed: [docs/training.md](training.md#which-recipe-measured).",
        render=exits_blocks,
        **RECIPES,
    ),
    "saturation": Section(
        title="Saturation events and probability vs similarity",
        claim="(the ICLR version's claims 4 and 5) the more similar layer l is to the last layer, the higher the "
        "probability the last-layer classifier gives (at l) to the last layer's class; and aligned training brings "
        "more early saturation events. A sample's *saturation layer* is the first layer from which the "
        "classifier's top-1 prediction stays the same up to the last layer L (L when it still changes at L). Early "
        "exit's patience rule (leave once the prediction has held for p more layers) is its online cousin: a "
        "sample saturated at s has left by layer min(s + p, L), with the full-depth answer whenever it leaves at or "
        "after s. f_l(x) is `pooled_layer_states`: block l's hidden states pooled with the model's pooling, "
        "*before* the classifier's final norm and pooler. The Spearman correlations pool every sample of layers "
        "1..L-1 (the last layer, at cosine 1, is left out); 'of layer means' correlates the L per-layer means. For "
        "per-layer heads the classifier at l is head l, not the last layer's: the claims concern the standard and "
        "aligned models, heads are shown for reference. Claims need 3 seeds; a single seed is marked as such.",
        files={"saturation/results.json": ("runs", "results", "missing", "settings")},
        commands=("python benchmarks/saturation.py --text-seed 1",),
        render=saturation_blocks,
        provenance=saturation_provenance,
    ),
    "projection_head": Section(
        title="Projection head: accuracy, and transfer before vs after it",
        claim="(Xue et al., arXiv 2403.11391) representations *before* a projection head transfer better than those "
        "after it, and lower layers are less specialized; with one classifier shared by every layer, a projection "
        "head (an MLP before the classification layer, `AlignedConfig(projection_head={})`) is where layer-specific "
        "differences could be absorbed. MiniLM, SST-2 (the recipes benchmark's settings and seeds; the rows without "
        "a head are its runs), three seeds, mean ± std in points. Transfer: each frozen SST-2 model probed per layer "
        "(layer 0: embeddings) with a logistic regression on AG News features, read before (`pre`) and after "
        "(`post`) the projection head.",
        files={"projection_head.json": ("runs", "transfer", "summary", "settings")},
        commands=("python benchmarks/projection_head.py",),
        render=module_blocks("projection_head", "projection_head.json"),
        provenance=tables_provenance("runs", "retrained_baselines", "transfer"),
    ),
    "asr": Section(
        title="ASR: folded channel scales",
        claim="(Zhong et al., arXiv 2304.06345) a constant per-channel scale on every block's attention and MLP "
        "outputs, learned through a small MLP from a learned constant input and folded into the output projections "
        "after training (`add_asr`, `fold_asr`), improves accuracy at no inference cost. Checked with standard and "
        "aligned training on the digits ViT (trained from scratch) and on MiniLM / SST-2 (the recipes benchmark's "
        "settings and seeds; the rows without ASR are its runs). Three seeds per row (mean ± std, accuracy in "
        "points); differences to the same training without ASR paired by seed; times in one process, one thread, "
        "alternating, best of N, with an A/A control that times the plain model against a copy of itself.",
        files={"asr.json": ("runs", "summary", "timing")},
        commands=("python benchmarks/asr.py", "python benchmarks/asr.py --phase timing"),
        render=module_blocks("asr", "asr.json"),
        provenance=tables_provenance("runs", "timing"),
    ),
    "calibration": Section(
        title="Exits you can trust: certified calibration",
        claim="`calibrate_exits` (Learn then Test: a grid fixed in advance, tested from the most conservative "
        "setting down with exact binomial p-values) promises that the early-exit prediction's risk on new data from "
        "the calibration distribution is at most epsilon with probability at least 1 - delta. Checked on the "
        "recipes checkpoints (library default and per-layer heads, three seeds) over 500 random calibration draws "
        "per seed and size from pools of unseen SST-2 and AG News data, each evaluated on the rest of its pool: "
        "the share of draws whose realized accuracy drop exceeds epsilon must stay at most delta; beside it the old "
        "empirical rule, the ideal and measured speed-ups (batch 32, one thread, `early_exit_predict` against the "
        "full forward, alternately) and the oracle (the best grid setting chosen on the evaluation data itself).",
        files={"calibration.json": ("runs", "summary", "curves", "targets", "settings")},
        commands=(
            "python benchmarks/calibration_data.py",
            "python benchmarks/calibration.py",
            "python benchmarks/calibration.py --phase speed",
        ),
        render=module_blocks("calibration", "calibration.json"),
    ),
    "scale": Section(
        title="Training on several processes: memory per process",
        claim="(issue #22) DeepSpeed ZeRO-3 on 2 processes holds at most 0.6 times the training state (parameters, "
        "gradients, optimizer state) per process of DDP, and every engine computes the same losses; evaluated in fp32 "
        "and with bf16 mixed precision (each against DDP in the same precision). An aligned causal LM large enough "
        "that the state dominates, trained through `accelerate launch` with the configs of `examples/accelerate/` on "
        "2 CPU processes (gloo); one seed (memory is deterministic here).",
        files={"scale.json": ("precisions", "settings")},
        commands=("python benchmarks/scale.py",),
        render=module_blocks("scale", "scale.json"),
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Running and rendering
# ----------------------------------------------------------------------------------------------------------------------


def run_sections(names: Sequence[str]) -> None:
    """Runs the commands of the named sections in order, each once, each in its own process."""
    commands = dict.fromkeys(command for name in names for command in SECTIONS[name].commands)
    for command in commands:
        print(f"\n>>> {command}", flush=True)
        argv = shlex.split(command)
        subprocess.run([sys.executable if argv[0] == "python" else argv[0], *argv[1:]], cwd=REPO, check=True)


def load_payloads(results_dir: Path) -> dict[str, dict]:
    """Every section's JSON, keyed by its path under `results_dir`.

    Raises:
        FileNotFoundError: a file is missing; the message names the commands that write it.
        ValueError: a file lacks keys its section reads (written by an older version of its script).
    """
    payloads = {}
    for name, section in SECTIONS.items():
        commands = " then ".join(f"`{command}`" for command in section.commands)
        for file, keys in section.files.items():
            path = results_dir / file
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: section {name!r} reads it; {commands} writes it.")
            payload = json.loads(path.read_text(encoding="utf-8"))
            absent = [key for key in keys if key not in payload]
            if absent:
                raise ValueError(
                    f"{path} has no {', '.join(map(repr, absent))}: it is not what section {name!r} reads; "
                    f"re-run {commands}."
                )
            payloads[file] = payload
    return payloads


def sources_table(payloads: Mapping[str, dict]) -> str:
    """One row per committed JSON: the commands, seeds, commits, machines and duration it records."""
    rows = []
    for section in SECTIONS.values():
        for file in section.files:
            if all(row[0] != f"`{file}`" for row in rows):
                rows.append([f"`{file}`", *section.provenance(payloads[file]).cells()])
    return print_table(
        f"JSON read from `{RESULTS_DIR.relative_to(REPO)}/`, with what each records of the runs that wrote it",
        ["JSON", "commands", "seeds", "commits", "machines", "duration"],
        rows,
    )


def _block(name: str, body: str) -> str:
    return f"<!-- BEGIN {name} -->\n{body.strip()}\n<!-- END {name} -->\n"


def render(results_dir: Path = RESULTS_DIR, docs: Path = DOCS) -> Path:
    """Writes `docs/results.md` and the figures it links (into `docs/figures/`) from the JSON under `results_dir`.

    Raises:
        ValueError: the results.md already in `docs` holds a block no section renders (its benchmark's entry is
            missing from `SECTIONS`), or a JSON file is not what its section reads.
        FileNotFoundError: a section's JSON is missing.

    Returns:
        The path of results.md.
    """
    payloads = load_payloads(results_dir)
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    text = [
        "# Reproduction report\n",
        "<!-- Generated by benchmarks/reproduce.py from the JSON under benchmarks/results/: edit that script or the "
        "benchmark, not this file. -->\n",
        "The claims of *On Layer-wise Representation Similarity: Application for Multi-Exit Models with a Single "
        "Classifier* (Jiang, Zhou, Zhu, arXiv 2406.14479) checked on the real data here. Every number and figure "
        "below is rendered from the JSON committed under `benchmarks/results/` (`python benchmarks/reproduce.py "
        "--render-only`); the Sources table at the end gives what each JSON records of the runs that wrote it.\n",
    ]
    rendered: list[str] = []
    for number, section in enumerate(SECTIONS.values(), start=1):
        blocks = section.render({file: payloads[file] for file in section.files}, figures)
        files = ", ".join(f"`benchmarks/results/{file}`" for file in section.files)
        commands = " then ".join(f"`{command}`" for command in section.commands)
        text += [
            f"## {number}. {section.title}\n",
            f"Claim: {section.claim}\n",
            f"JSON: {files}, written by {commands}.\n",
        ]
        text += [_block(name, body) for name, body in blocks.items()]
        rendered += blocks
    text += ["## Sources\n", _block("report-sources", sources_table(payloads))]
    path = docs / "results.md"
    if path.exists():
        orphans = sorted(set(BLOCK.findall(path.read_text(encoding="utf-8"))) - {*rendered, "report-sources"})
        if orphans:
            raise ValueError(
                f"{path} holds block(s) {', '.join(orphans)} that no section of benchmarks/reproduce.py renders: add "
                "their benchmark's entry to SECTIONS (see its docstring) instead of dropping them."
            )
    path.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render-only", action="store_true", help="Render from the committed JSON; run nothing.")
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="Whose commands to run."
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="Where the JSON is read.")
    parser.add_argument("--docs", type=Path, default=DOCS, help="Where results.md and figures/ are written.")
    args = parser.parse_args(argv)
    if not args.render_only:
        run_sections(args.sections)
    try:
        render(args.results, args.docs)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
