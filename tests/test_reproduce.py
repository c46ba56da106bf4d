"""benchmarks/reproduce.py: the report's numbers are the JSON's, its figures exist, missing results say what to run."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = 6
KIND_LABELS = {"standard": "standard", "aligned": "aligned", "per_layer": "per-layer heads"}
EXIT_ENTRIES = ("sst2-minilm/aligned", "sst2-minilm/per_layer", "digits-vit/aligned", "digits-vit/per_layer")


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reproduce = load_reproduce()


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: small JSON in each benchmark's format, with random numbers
# ----------------------------------------------------------------------------------------------------------------------


def eval_metrics(rng: random.Random) -> dict:
    metrics = {f"eval_layer_{layer}_accuracy": rng.random() for layer in range(1, LAYERS + 1)}
    return metrics | {"eval_loss": rng.random(), "eval_minimal_depth": rng.randint(1, LAYERS)}


def train_aligned_payload(rng: random.Random) -> dict:
    variants = {kind: {"eval": eval_metrics(rng), "median_step_time": rng.random()} for kind in KIND_LABELS}
    return {
        "dev_accuracy_by_layer": {
            kind: [variant["eval"][f"eval_layer_{layer}_accuracy"] for layer in range(1, LAYERS + 1)]
            for kind, variant in variants.items()
        },
        "ratios": {"step_time_aligned_vs_standard": rng.uniform(0.5, 2), "peak_rss_aligned_vs_standard": rng.random()},
        "targets_met": {"step_time_ratio <= 1.10": True, "aligned layer 6 within 1 point of standard": False},
        "pooling": "mean",
        "settings": {
            "train_samples": rng.randint(100, 10_000),
            "max_seq_length": 64,
            "batch_size": 32,
            "learning_rate": 1e-4,
            "aligned_layer_weights": "linear",
        },
        "variants": variants,
    }


def similarity_payloads(rng: random.Random) -> tuple[dict, dict]:
    def agreement():
        return {"spearman": rng.random(), "pearson": rng.random(), "num_pairs": 21}

    minilm = {
        "source": "trainer benchmark checkpoints",
        "num_samples": rng.randint(100, 900),
        "models": {
            kind: {
                "agreement": agreement(),
                "agreement_blocks": agreement(),
                "off_diagonal_mean": {"cos": rng.random(), "cka": rng.random()},
                "similarity_to_last_block": {
                    measure: [rng.random() for _ in range(LAYERS - 1)] for measure in ("cos", "cka")
                },
            }
            for kind in KIND_LABELS
        },
    }
    synthetic = {
        "num_representations": 13,
        "num_samples": rng.randint(1000, 20_000),
        "hidden_size": 768,
        "device": "cpu",
        "seconds": {
            name: rng.uniform(0.1, 100)
            for name in ("hf_aligned_cos", "hf_aligned_cka", "naive_numpy_cos", "naive_numpy_cka")
        },
        "speed_ratio": {"cos": rng.uniform(1, 20), "cka": rng.uniform(1, 20), "total": rng.uniform(1, 20)},
        "max_abs_difference": {"cos": rng.uniform(1e-15, 1e-13), "cka": rng.uniform(1e-10, 1e-8)},
        "agreement": {"spearman": rng.random(), "pearson": rng.random(), "num_pairs": 78},
    }
    return minilm, synthetic


def early_exit_payload(rng: random.Random) -> dict:
    results = {}
    for name in EXIT_ENTRIES:
        thresholds = sorted(rng.sample(range(500, 1000), 4))
        calibrated = rng.randrange(len(thresholds))
        full_accuracy = rng.random()
        sweep = [
            {
                "threshold": threshold / 1000,
                "accuracy": rng.random(),
                "full_accuracy": full_accuracy,
                "mean_exit_layer": rng.uniform(1, LAYERS),
                "ideal_speedup": rng.uniform(1, LAYERS),
                "measured_speedup_batch1": rng.uniform(0.5, 4),
                "measured_speedup_batch32": rng.uniform(0.5, 4),
                "measured_over_ideal_batch1": rng.random(),
                "measured_over_ideal_batch32": rng.random(),
                "calibrated": index == calibrated,
            }
            for index, threshold in enumerate(thresholds)
        ]
        results[name] = {
            "calibration": {"num_layers": LAYERS, "chosen": thresholds[calibrated] / 1000},
            "sweep": sweep,
        }
    return {"torch_threads": 2, "results": results, "tables": []}


def demo_payload(rng: random.Random) -> dict:
    return {label: eval_metrics(rng) for label in KIND_LABELS.values()}


def saturation_entry(rng: random.Random, task: str, kind: str, seed: int) -> dict:
    histogram = [rng.randint(0, 50) for _ in range(LAYERS)]
    histogram[-1] += 1
    total = sum(histogram)

    def correlations() -> dict:
        return {
            "spearman": rng.uniform(-1, 1),
            "spearman_within_layer": [rng.uniform(-1, 1) for _ in range(LAYERS - 1)],
            "spearman_of_layer_means": rng.uniform(-1, 1),
        }

    return {
        "task": task,
        "variant": kind,
        "seed": seed,
        "checkpoint": f"/ckpt/{task}/{kind}",
        "num_layers": LAYERS,
        "num_samples": total,
        "layer_accuracy": [rng.random() for _ in range(LAYERS)],
        "saturation": {
            "num_layers": LAYERS,
            "num_samples": total,
            "mean": sum(layer * count for layer, count in enumerate(histogram, start=1)) / total,
            "histogram": histogram,
            "saturated_by": [sum(histogram[:layer]) / total for layer in range(1, LAYERS + 1)],
        },
        "probability_similarity": {
            "mean_cosine": [rng.random() for _ in range(LAYERS)],
            "mean_last_class_probability": [rng.random() for _ in range(LAYERS)],
            "mean_true_class_probability": [rng.random() for _ in range(LAYERS)],
            "last_class": correlations(),
            "true_class": correlations(),
        },
    }


SATURATION_SEEDS = {"sst2": [0], "digits": [0, 1, 2]}


def saturation_payload(rng: random.Random) -> dict:
    results = {
        f"{task}/{kind}/seed{seed}": saturation_entry(rng, task, kind, seed)
        for task, seeds in SATURATION_SEEDS.items()
        for kind in KIND_LABELS
        for seed in seeds
    }
    machine = {
        "date": "d",
        "cpu": "Test CPU, 2 cores",
        "gpu": "none",
        "platform": "p",
        "software": "s",
        "commit": "c0",
    }
    return {
        "results": results,
        "missing": {f"ag_news/{kind}/seed0": [f"/ckpt/ag_news/{kind}"] for kind in KIND_LABELS},
        "representation": "pooled_layer_states",
        "runs": [
            {"command": "python benchmarks/saturation.py", "machine": machine, "duration_s": 120.0, "torch_threads": 1}
        ],
    }


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A benchmark outputs folder with every JSON the report reads, and the similarity benchmark's two PNGs."""
    rng = random.Random(0)
    folder = tmp_path / "outputs"
    minilm, synthetic = similarity_payloads(rng)
    payloads = {
        "train_aligned/results.json": train_aligned_payload(rng),
        "similarity/minilm_sst2.json": minilm,
        "similarity/synthetic.json": synthetic,
        "early_exit.json": early_exit_payload(rng),
        "demo/metrics.json": demo_payload(rng),
        "saturation/results.json": saturation_payload(rng),
    }
    for file, payload in payloads.items():
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_text(json.dumps(payload), encoding="utf-8")
    for index, name in enumerate(("minilm_sst2_similarity.png", "minilm_sst2_accuracy.png")):
        (folder / "similarity" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([index]) * 64)
    return folder


def read(outputs: Path, file: str) -> dict:
    return json.loads((outputs / file).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------------
# Reading the Markdown back
# ----------------------------------------------------------------------------------------------------------------------


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Every Markdown table as a list of {header: cell} rows, keyed by the last non-empty line above it."""
    found, title, lines = {}, None, markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("|"):
            block = []
            while index < len(lines) and lines[index].startswith("|"):
                block.append([cell.strip() for cell in lines[index].strip("|").split("|")])
                index += 1
            headers, rows = block[0], block[2:]
            found[title] = [dict(zip(headers, row)) for row in rows]
            continue
        if line.strip():
            title = line.strip()
        index += 1
    return found


def table(markdown: str, title_part: str) -> list[dict[str, str]]:
    matches = [rows for title, rows in tables(markdown).items() if title and title_part in title]
    assert len(matches) == 1, f"expected one table titled like {title_part!r}"
    return matches[0]


def number(cell: str) -> float:
    return float(cell.strip("`"))


def same(cell: str, value: float) -> bool:
    """The cell shows `value` (to the three decimals the report prints)."""
    return abs(number(cell) - value) <= 5e-4 + 1e-12


def assert_layer_table(rows: list[dict[str, str]], metrics_by_label: dict[str, dict]) -> None:
    assert [row["layer"] for row in rows] == [*(str(layer) for layer in range(1, LAYERS + 1)), "minimal depth"]
    for label, metrics in metrics_by_label.items():
        for layer in range(1, LAYERS + 1):
            assert same(rows[layer - 1][label], metrics[f"eval_layer_{layer}_accuracy"]), (label, layer)
        assert int(rows[-1][label]) == metrics["eval_minimal_depth"]


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def rendered(outputs: Path, tmp_path: Path) -> str:
    return reproduce.render(outputs, tmp_path / "docs").read_text(encoding="utf-8")


def test_layerwise_numbers_are_the_json(rendered, outputs):
    trained = read(outputs, "train_aligned/results.json")
    assert_layer_table(
        table(rendered, "SST-2 dev accuracy after every layer"),
        {label: trained["variants"][kind]["eval"] for kind, label in KIND_LABELS.items()},
    )
    assert f"on {trained['settings']['train_samples']} SST-2 training phrases" in rendered
    ratios = {row["ratio"].strip("`"): row["value"] for row in table(rendered, "Cost of aligned training")}
    assert ratios.keys() == trained["ratios"].keys()
    assert all(same(ratios[name], value) for name, value in trained["ratios"].items())
    targets = {row["target"]: row["met"] for row in table(rendered, "own targets")}
    assert targets == {name: "yes" if met else "no" for name, met in trained["targets_met"].items()}
    assert_layer_table(table(rendered, "Digits held-out accuracy"), read(outputs, "demo/metrics.json"))


def test_similarity_numbers_are_the_json(rendered, outputs):
    minilm = read(outputs, "similarity/minilm_sst2.json")
    assert f"MiniLM on SST-2 dev ({minilm['num_samples']} sentences)" in rendered
    agreement = {row["model"]: row for row in table(rendered, "Agreement of the COS and CKA matrices")}
    for kind, label in KIND_LABELS.items():
        entry, row = minilm["models"][kind], agreement[label]
        assert same(row["Spearman"], entry["agreement"]["spearman"])
        assert same(row["Pearson"], entry["agreement"]["pearson"])
        assert same(row["Spearman (blocks only)"], entry["agreement_blocks"]["spearman"])
        assert same(row["mean COS"], entry["off_diagonal_mean"]["cos"])
        assert same(row["mean CKA"], entry["off_diagonal_mean"]["cka"])
    to_last = table(rendered, "Similarity of each block to the last block")
    assert len(to_last) == 2 * len(KIND_LABELS)
    for row in to_last:
        kind = next(kind for kind, label in KIND_LABELS.items() if label == row["model"])
        values = minilm["models"][kind]["similarity_to_last_block"][row["measure"].lower()]
        assert all(same(row[f"layer {layer}"], value) for layer, value in enumerate(values, start=1))

    synthetic = read(outputs, "similarity/synthetic.json")
    speed = {row["matrix"]: row for row in table(rendered, "against a naive per-pair numpy loop")}
    for measure in ("cos", "cka"):
        row = speed[measure.upper()]
        assert same(row["hf_aligned (s)"], synthetic["seconds"][f"hf_aligned_{measure}"])
        assert same(row["naive numpy (s)"], synthetic["seconds"][f"naive_numpy_{measure}"])
        assert same(row["speed ratio"], synthetic["speed_ratio"][measure])
        assert number(row["max abs difference"]) == pytest.approx(synthetic["max_abs_difference"][measure], rel=0.05)
    assert f"{synthetic['num_samples']} samples" in rendered


def test_early_exit_numbers_are_the_json(rendered, outputs):
    exits = read(outputs, "early_exit.json")["results"]
    calibrated = table(rendered, "At the calibrated threshold")
    assert [(row["task"], row["model"]) for row in calibrated] == [
        (name.split("/")[0], KIND_LABELS[name.split("/")[1]]) for name in EXIT_ENTRIES
    ]
    columns = {
        "full depth": "full_accuracy",
        "threshold": "threshold",
        "accuracy": "accuracy",
        "mean exit": "mean_exit_layer",
        "ideal x": "ideal_speedup",
        "measured x b1": "measured_speedup_batch1",
        "measured x b32": "measured_speedup_batch32",
    }
    for name, row in zip(EXIT_ENTRIES, calibrated):
        point = next(point for point in exits[name]["sweep"] if point["calibrated"])
        assert all(same(row[column], point[key]) for column, key in columns.items()), name
    for name, entry in exits.items():
        rows = table(rendered, f"**{name}**")
        assert len(rows) == len(entry["sweep"])
        for row, point in zip(rows, entry["sweep"]):
            assert all(same(row[column], point[key]) for column, key in columns.items() if column != "full depth")
            assert row["calibrated"] == ("yes" if point["calibrated"] else "")
    assert "Tasks not in this run: ag_news-minilm." in rendered


def spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation, computed with numpy (None for one value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def same_spread(cell: str, values: list[float]) -> bool:
    mean, std = spread(values)
    parts = cell.split(" ± ")
    if std is None:
        return len(parts) == 1 and same(parts[0], mean)
    return len(parts) == 2 and same(parts[0], mean) and same(parts[1], std)


def test_saturation_numbers_are_the_json(rendered, outputs):
    payload = read(outputs, "saturation/results.json")
    for task, seeds in SATURATION_SEEDS.items():
        rows = {row["model"]: row for row in table(rendered, f"**{task}: saturation and rank correlation")}
        assert set(rows) == set(KIND_LABELS.values())
        for kind, label in KIND_LABELS.items():
            entries = [payload["results"][f"{task}/{kind}/seed{seed}"] for seed in seeds]
            row = rows[label]
            assert int(row["seeds"]) == len(seeds)
            assert same_spread(row["mean saturation layer"], [entry["saturation"]["mean"] for entry in entries])
            assert same_spread(row["accuracy (last layer)"], [entry["layer_accuracy"][-1] for entry in entries])
            assert same_spread(
                row["saturated by layer 1"], [entry["saturation"]["saturated_by"][0] for entry in entries]
            )
            similarity = [entry["probability_similarity"] for entry in entries]
            assert same_spread(
                row["Spearman, p(last class)"], [value["last_class"]["spearman"] for value in similarity]
            )
            assert same_spread(
                row["Spearman, p(true class)"], [value["true_class"]["spearman"] for value in similarity]
            )
        shares = {
            row["model"]: row for row in table(rendered, f"**{task}: share of samples saturated by each layer**")
        }
        for kind, label in KIND_LABELS.items():
            entries = [payload["results"][f"{task}/{kind}/seed{seed}"] for seed in seeds]
            for layer in range(1, LAYERS + 1):
                expected = spread([entry["saturation"]["saturated_by"][layer - 1] for entry in entries])[0]
                assert same(shares[label][f"layer {layer}"], expected)
        # The verdict on claim 5 follows the numbers, seed by seed.
        earlier = [
            payload["results"][f"{task}/aligned/seed{seed}"]["saturation"]["mean"]
            < payload["results"][f"{task}/standard/seed{seed}"]["saturation"]["mean"]
            for seed in seeds
        ]
        verdict = "holds" if all(earlier) else "does not hold" if not any(earlier) else "is mixed"
        assert f"earlier in {sum(earlier)} of {len(seeds)} seed(s)" in rendered
        assert f"Claim 5 (aligned training saturates earlier) **{verdict}**" in rendered
    assert "(one seed: indicative only)" in rendered
    assert "_Not measured yet: no ag_news checkpoint was found (looked in `/ckpt/ag_news/standard`" in rendered


def test_saturation_section_without_results_says_what_is_missing(outputs, tmp_path):
    payload = read(outputs, "saturation/results.json")
    payload["missing"] = {}
    payload["results"] = {key: entry for key, entry in payload["results"].items() if entry["variant"] != "standard"}
    (outputs / "saturation" / "results.json").write_text(json.dumps(payload), encoding="utf-8")
    rendered = reproduce.render(outputs, tmp_path / "docs").read_text(encoding="utf-8")
    assert "_Not measured yet: ag_news was not among the tasks run." in rendered
    assert "_No checkpoint measured for: standard._" in rendered
    assert "Claim 5 cannot be judged: it needs the standard and the aligned model of the same seed." in rendered

    (outputs / "saturation" / "results.json").unlink()
    rendered = reproduce.render(outputs, tmp_path / "docs", allow_missing=True).read_text(encoding="utf-8")
    assert "_Not run yet: `python benchmarks/saturation.py --output" in rendered


def test_figures_are_written_linked_and_small(rendered, outputs, tmp_path):
    figures = tmp_path / "docs" / "figures"
    linked = set(re.findall(r"\]\(figures/([^)]+)\)", rendered))
    assert linked == {png.name for png in figures.glob("*.png")}
    expected = {
        "headline.png",
        "sst2_layer_accuracy.png",
        "digits_layer_accuracy.png",
        "early_exit_tradeoff.png",
        "minilm_sst2_similarity.png",
        "minilm_sst2_accuracy.png",
        "sst2_saturation.png",
        "digits_saturation.png",
    }
    # The recipes section reads the committed benchmarks/results/recipes.json, not the test's outputs folder.
    if reproduce.RECIPES_RESULTS.exists():
        expected.add(reproduce.RECIPES_FIGURE.name)
    assert linked == expected
    for name in linked:
        data = (figures / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 300_000, name
    for name in ("minilm_sst2_similarity.png", "minilm_sst2_accuracy.png"):
        assert (figures / name).read_bytes() == (outputs / "similarity" / name).read_bytes()
    assert rendered.index("figures/headline.png") < rendered.index("## 1.")


def test_commands_and_machine_come_from_the_manifest(outputs, tmp_path):
    machine = {
        "date": "2030-01-02 03:04 UTC",
        "cpu": "Test CPU, 64 cores",
        "gpu": "none",
        "platform": "Linux",
        "software": "Python 3.11, torch X, transformers Y",
        "commit": "abc1234",
    }
    command = "python benchmarks/early_exit.py --tasks digits"
    manifest = {"early_exit": {"command": command, "wall_time_s": 90.0, "machine": machine}}
    (outputs / "reproduce.json").write_text(json.dumps(manifest), encoding="utf-8")
    rendered = reproduce.render(outputs, tmp_path / "docs").read_text(encoding="utf-8")
    assert f"Command: `{command}`" in rendered
    assert (
        "Run by `reproduce.py` on Test CPU, 64 cores; GPU: none; Python 3.11, torch X, transformers Y: early_exit"
        in (rendered)
    )
    assert "No machine on record for benchmarks run on their own" in rendered
    sources = {row["JSON"]: row for row in table(rendered, "JSON read from")}
    assert sources["`early_exit.json`"]["command"] == f"`{command}`"
    assert sources["`early_exit.json`"]["wall time"] == "1.5 min"
    assert sources["`demo/metrics.json`"]["wall time"] == "-"


def test_missing_json_names_the_command_to_run(outputs, tmp_path, capsys):
    (outputs / "early_exit.json").unlink()
    (outputs / "demo" / "metrics.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"early_exit\.json \(written by `python benchmarks/early_exit\.py"
    ) as error:
        reproduce.render(outputs, tmp_path / "docs")
    assert "`python examples/demo.py --output_dir" in str(error.value)
    assert "--allow-missing" in str(error.value)

    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--render-only", "--outputs", str(outputs), "--docs", str(tmp_path / "docs")])
    assert exit_info.value.code == 1
    assert "python benchmarks/early_exit.py --output" in capsys.readouterr().err

    rendered = reproduce.render(outputs, tmp_path / "docs", allow_missing=True).read_text(encoding="utf-8")
    assert (
        f"_Not run yet: `{reproduce.BENCHMARKS['early_exit'].command(outputs)}` writes `early_exit.json`._" in rendered
    )
    assert "_Not run yet: `python examples/demo.py" in rendered
    figures = {png.name for png in (tmp_path / "docs" / "figures").glob("*.png")}
    assert "early_exit_tradeoff.png" not in figures and "digits_layer_accuracy.png" not in figures
    assert "headline.png" in figures  # still drawn, from the trainer benchmark alone


def test_json_of_another_format_is_refused(outputs, tmp_path):
    (outputs / "similarity" / "synthetic.json").write_text(json.dumps({"seconds": {}}), encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"synthetic\.json has no 'speed_ratio', 'max_abs_difference', 'agreement'.*re-run"
    ):
        reproduce.render(outputs, tmp_path / "docs")


def test_benchmarks_reuse_the_trainer_checkpoints(tmp_path):
    out = tmp_path / "out"
    checkpoints = {kind: str(out / "train_aligned" / kind) for kind in KIND_LABELS}
    similarity = reproduce.BENCHMARKS["similarity"].argv(out)
    for flag, kind in (("--standard", "standard"), ("--aligned", "aligned"), ("--per-layer", "per_layer")):
        assert similarity[similarity.index(flag) + 1] == checkpoints[kind]
    early_exit = reproduce.BENCHMARKS["early_exit"].argv(out)
    assert early_exit[early_exit.index("--sst2-aligned") + 1] == checkpoints["aligned"]
    assert early_exit[early_exit.index("--sst2-per-layer") + 1] == checkpoints["per_layer"]
    saturation = reproduce.BENCHMARKS["saturation"].argv(out)
    given = [saturation[index + 1] for index, flag in enumerate(saturation) if flag == "--checkpoint"]
    assert given == [f"sst2/{kind}={path}" for kind, path in checkpoints.items()]
    trainer = reproduce.BENCHMARKS["train_aligned"].argv(out)
    assert trainer[trainer.index("--output_dir") + 1] == str(out / "train_aligned")


@pytest.mark.parametrize("name", list(reproduce.BENCHMARKS))
def test_every_flag_passed_is_one_the_script_defines(name):
    benchmark = reproduce.BENCHMARKS[name]
    script = REPO / benchmark.script
    if not script.exists():
        pytest.skip(f"{benchmark.script} is not on this branch yet")
    source = script.read_text(encoding="utf-8")
    flags = [argument for argument in benchmark.argv(Path("/out")) if argument.startswith("--")]
    assert flags and all(f'"{flag}"' in source for flag in flags)


def test_run_benchmarks_runs_each_script_and_records_it(tmp_path, monkeypatch):
    script = tmp_path / "fake_benchmark.py"
    script.write_text(
        "import json, sys\nopen(sys.argv[2], 'w').write(json.dumps({'argv': sys.argv[1:]}))\n", encoding="utf-8"
    )
    fake = reproduce.Benchmark(str(script), ("fake.json",), lambda out: ["--output", out / "fake.json"])
    monkeypatch.setattr(reproduce, "BENCHMARKS", {"fake": fake})
    outputs = tmp_path / "out"
    outputs.mkdir()
    (outputs / "reproduce.json").write_text(json.dumps({"earlier": {"command": "x"}}), encoding="utf-8")
    reproduce.run_benchmarks(["fake"], outputs)
    assert read(outputs, "fake.json") == {"argv": ["--output", str(outputs / "fake.json")]}
    manifest = read(outputs, "reproduce.json")
    assert manifest["earlier"] == {"command": "x"}
    assert manifest["fake"]["command"] == f"python {script} --output {outputs / 'fake.json'}"
    assert manifest["fake"]["wall_time_s"] >= 0
    assert set(manifest["fake"]["machine"]) == {"date", "cpu", "gpu", "platform", "software", "commit"}
