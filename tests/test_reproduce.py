"""benchmarks/reproduce.py: the committed report is exactly the rendering of the committed JSON, its numbers are the
JSON's, its figures exist and are linked, missing or foreign JSON says what to run, other benchmarks' blocks survive."""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_testing import load_benchmark

REPO = Path(__file__).resolve().parents[1]
LAYERS = 6
KIND_LABELS = {"standard": "standard", "aligned": "aligned", "per_layer": "per-layer heads"}


reproduce = load_benchmark("reproduce")
recipes = sys.modules["recipes"]


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: the committed recipes JSON, and small JSON in the other benchmarks' formats with random numbers
# ----------------------------------------------------------------------------------------------------------------------


def similarity_payloads(rng: random.Random) -> tuple[dict, dict]:
    def agreement():
        return {"spearman": rng.random(), "pearson": rng.random(), "num_pairs": 21}

    def matrix():
        values = np.array([[rng.random() for _ in range(LAYERS + 1)] for _ in range(LAYERS + 1)])
        return ((values + values.T) / 2).tolist()

    minilm = {
        "source": "trainer benchmark checkpoints",
        "num_samples": rng.randint(100, 900),
        "majority_class_share": 0.5,
        "models": {
            kind: {
                "cos": matrix(),
                "cka": matrix(),
                "agreement": agreement(),
                "agreement_blocks": agreement(),
                "off_diagonal_mean": {"cos": rng.random(), "cka": rng.random()},
                "similarity_to_last_block": {
                    measure: [rng.random() for _ in range(LAYERS - 1)] for measure in ("cos", "cka")
                },
                "classifier_accuracy": [rng.random() for _ in range(LAYERS)],
                "probe_accuracy": {"test_accuracy": [rng.random() for _ in range(LAYERS + 1)]},
            }
            for kind in KIND_LABELS
        },
        "provenance": {
            "command": "python benchmarks/similarity.py --part minilm",
            "seeds": [0],
            "commit": "abc1234",
            "machine": "Test CPU, 64 cores",
            "duration_s": 90.0,
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
        "settings": {
            "data": {"sst2": "SST-2 dev", "digits": "digits"},
            "text_max_length": 64,
            "digits_model": "a ViT",
            "digits_training": "30 epochs",
        },
        "runs": [
            {"command": "python benchmarks/saturation.py", "machine": machine, "duration_s": 120.0, "torch_threads": 1}
        ],
    }


def write_results(folder: Path) -> Path:
    """A results folder with every JSON the report reads: similarity and saturation random, the others committed."""
    rng = random.Random(0)
    minilm, synthetic = similarity_payloads(rng)
    payloads = {
        "similarity/minilm_sst2.json": minilm,
        "similarity/synthetic.json": synthetic,
        "saturation/results.json": saturation_payload(rng),
    }
    for file, payload in payloads.items():
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_text(json.dumps(payload), encoding="utf-8")
    # The benchmarks whose own render_blocks the report calls (recipes, projection head, ...): their committed JSON.
    for section in reproduce.SECTIONS.values():
        for file in section.files:
            if file not in payloads:
                shutil.copyfile(reproduce.RESULTS_DIR / file, folder / file)
    return folder


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def rendered_docs(results_dir: Path, tmp_path_factory) -> Path:
    """The docs folder rendered once from the fixture's JSON (drawing the figures is what takes time)."""
    docs = tmp_path_factory.mktemp("docs")
    reproduce.render(results_dir, docs)
    return docs


@pytest.fixture(scope="module")
def rendered(rendered_docs: Path) -> str:
    return (rendered_docs / "results.md").read_text(encoding="utf-8")


def read(folder: Path, file: str) -> dict:
    return json.loads((folder / file).read_text(encoding="utf-8"))


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


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------


def test_committed_report_is_the_rendering_of_the_committed_json(tmp_path):
    """A number typed into docs/results.md by hand, or JSON changed without re-rendering, fails here."""
    docs = tmp_path / "docs"
    reproduce.render(reproduce.RESULTS_DIR, docs)
    committed = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    assert (docs / "results.md").read_text(encoding="utf-8") == committed, (
        "docs/results.md is out of date: run `python benchmarks/reproduce.py --render-only`"
    )
    linked = set(re.findall(r"\]\(figures/([^)]+)\)", committed))
    assert linked == {png.name for png in (docs / "figures").glob("*.png")}
    assert all((REPO / "docs" / "figures" / name).is_file() for name in linked)


def test_every_committed_figure_is_linked_from_a_page():
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    linked = set(re.findall(r"figures/([\w.-]+\.png)", text))
    assert {png.name for png in (REPO / "docs" / "figures").glob("*.png")} == linked


def test_sections_hold_the_recipes_blocks_and_every_block_is_the_json(rendered, results_dir):
    recipes_json = read(results_dir, "recipes.json")
    assert recipes.replace_blocks(rendered, recipes.render_blocks(recipes_json)) == rendered
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", rendered, re.M | re.S))
    assert list(sections)[:4] == [
        "1. Layer-wise accuracy: standard vs aligned vs per-layer heads",
        "2. Layer similarity: COS vs CKA",
        "3. Multi-exit: one shared classifier vs per-layer heads",
        "4. Saturation events and probability vs similarity",
    ]
    numbered = [f"{number}. {section.title}" for number, section in enumerate(reproduce.SECTIONS.values(), start=1)]
    assert list(sections) == [*numbered, "Sources"]
    layers, exits = sections[next(iter(sections))], sections["3. Multi-exit: one shared classifier vs per-layer heads"]
    for task in recipes_json["summary"]:
        assert f"<!-- BEGIN recipes-accuracy-{task} -->" in layers
        assert f"<!-- BEGIN recipes-exits-{task} -->" in exits
    assert "<!-- BEGIN recipes-targets -->" in exits
    assert "figures/recipes_layers.png" in layers


def test_similarity_numbers_are_the_json(rendered, results_dir):
    minilm = read(results_dir, "similarity/minilm_sst2.json")
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

    synthetic = read(results_dir, "similarity/synthetic.json")
    speed = {row["matrix"]: row for row in table(rendered, "against a naive per-pair numpy loop")}
    for measure in ("cos", "cka"):
        row = speed[measure.upper()]
        assert same(row["hf_aligned (s)"], synthetic["seconds"][f"hf_aligned_{measure}"])
        assert same(row["naive numpy (s)"], synthetic["seconds"][f"naive_numpy_{measure}"])
        assert same(row["speed ratio"], synthetic["speed_ratio"][measure])
        assert number(row["max abs difference"]) == pytest.approx(synthetic["max_abs_difference"][measure], rel=0.05)
    assert f"{synthetic['num_samples']} samples" in rendered


def test_sources_show_what_each_json_records(rendered, results_dir):
    sources = {row["JSON"]: row for row in table(rendered, "JSON read from `benchmarks/results/`")}
    files = dict.fromkeys(file for section in reproduce.SECTIONS.values() for file in section.files)
    assert list(sources) == [f"`{file}`" for file in files]
    assert list(sources)[:4] == [
        "`recipes.json`",
        "`similarity/minilm_sst2.json`",
        "`similarity/synthetic.json`",
        "`saturation/results.json`",
    ]
    minilm = sources["`similarity/minilm_sst2.json`"]
    assert minilm == {
        "JSON": "`similarity/minilm_sst2.json`",
        "commands": "`python benchmarks/similarity.py --part minilm`",
        "seeds": "0",
        "commits": "abc1234",
        "machines": "Test CPU, 64 cores",
        "duration": "1.5 min over 1 run(s)",
    }
    assert set(sources["`similarity/synthetic.json`"].values()) == {"`similarity/synthetic.json`", "not recorded"}
    runs = read(results_dir, "recipes.json")["runs"].values()
    recipes_row = sources["`recipes.json`"]
    assert recipes_row["seeds"] == ", ".join(map(str, sorted({run["seed"] for run in runs})))
    assert {f"`{run['provenance']['command']}`" for run in runs} <= set(recipes_row["commands"].split("<br>"))
    assert recipes_row["duration"].startswith(
        f"{sum(run['wall_time_s'] for run in runs) / 60:.1f} min over {len(runs)}"
    )
    saturation = sources["`saturation/results.json`"]
    assert saturation["commits"] == "c0" and saturation["duration"] == "2.0 min over 1 run(s)"
    assert saturation["seeds"] == "0, 1, 2"


def spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation, computed with numpy (None for one value)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def same_spread(cell: str, values: list[float]) -> bool:
    mean, std = spread(values)
    parts = cell.split(" ± ")
    if std is None:
        return len(parts) == 1 and same(parts[0], mean)
    return len(parts) == 2 and same(parts[0], mean) and same(parts[1], std)


def test_saturation_numbers_are_the_json(rendered, results_dir):
    payload = read(results_dir, "saturation/results.json")
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


def test_saturation_blocks_say_what_is_missing(results_dir, tmp_path):
    payload = read(results_dir, "saturation/results.json")
    payload["missing"] = {}
    payload["results"] = {
        key: entry
        for key, entry in payload["results"].items()
        if entry["variant"] != "standard" and entry["seed"] == 0
    }
    blocks = reproduce.saturation_blocks({"saturation/results.json": payload}, tmp_path)
    assert "_Not measured yet: ag_news was not among the tasks run." in blocks["saturation-ag_news"]
    assert "_No checkpoint measured for: standard._" in blocks["saturation-sst2"]
    assert (
        "Claim 5 cannot be judged: it needs the standard and the aligned model of the same seed."
        in (blocks["saturation-sst2"])
    )


def test_figures_are_written_linked_and_small(rendered, rendered_docs):
    linked = set(re.findall(r"\]\(figures/([^)]+)\)", rendered))
    assert linked == {png.name for png in (rendered_docs / "figures").glob("*.png")}
    assert linked == {
        "recipes_layers.png",
        "minilm_sst2_similarity.png",
        "minilm_sst2_accuracy.png",
        "sst2_saturation.png",
        "digits_saturation.png",
    }
    for name in linked:
        data = (rendered_docs / "figures" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 300_000, name


def test_missing_json_names_the_commands_to_run(tmp_path, capsys):
    results = write_results(tmp_path / "results")
    (results / "similarity" / "synthetic.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"synthetic\.json is missing: section 'similarity' reads it; "):
        reproduce.render(results, tmp_path / "docs")
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--render-only", "--results", str(results), "--docs", str(tmp_path / "docs")])
    assert exit_info.value.code == 1
    assert "`python benchmarks/similarity.py` writes it" in capsys.readouterr().err
    assert not (tmp_path / "docs" / "results.md").exists()


def test_json_of_another_format_is_refused(tmp_path):
    results = write_results(tmp_path / "results")
    (results / "similarity" / "synthetic.json").write_text(json.dumps({"seconds": {}}), encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"synthetic\.json has no 'speed_ratio', 'max_abs_difference', 'agreement'.*re-run"
    ):
        reproduce.render(results, tmp_path / "docs")


@pytest.fixture
def asr_section(tmp_path, monkeypatch):
    """A benchmark added the way the docstring says: its script's render_blocks, its JSON, one registry entry."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "fake_asr.py").write_text(
        "def render_blocks(results):\n    return {'asr-wer': f\"| WER |\\n|---|\\n| {results['wer']:.3f} |\"}\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(scripts))
    results = tmp_path / "results"
    results.mkdir()
    provenance = {"command": "python benchmarks/asr.py", "seeds": [0, 1, 2], "commit": "c1", "machine": "m"}
    (results / "asr.json").write_text(json.dumps({"wer": 0.1234, "provenance": [provenance]}), encoding="utf-8")
    section = reproduce.Section(
        title="Speech recognition",
        claim="aligned training works on speech too.",
        files={"asr.json": ("wer",)},
        commands=("python benchmarks/asr.py",),
        render=reproduce.module_blocks("fake_asr", "asr.json"),
    )
    monkeypatch.setattr(reproduce, "SECTIONS", {"asr": section})
    return results


def test_a_new_section_is_one_registry_entry(asr_section, tmp_path):
    text = reproduce.render(asr_section, tmp_path / "docs").read_text(encoding="utf-8")
    assert "## 1. Speech recognition\n\nClaim: aligned training works on speech too." in text
    assert "<!-- BEGIN asr-wer -->\n| WER |\n|---|\n| 0.123 |\n<!-- END asr-wer -->" in text
    row = table(text, "JSON read from")[0]
    assert row["commands"] == "`python benchmarks/asr.py`" and row["seeds"] == "0, 1, 2"
    assert row["duration"] == "not recorded"


def test_blocks_no_section_renders_are_refused_not_dropped(asr_section, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    report = "# Report\n<!-- BEGIN causal-lm-perplexity -->\n| 12.3 |\n<!-- END causal-lm-perplexity -->\n"
    (docs / "results.md").write_text(report, encoding="utf-8")
    with pytest.raises(ValueError, match=r"block\(s\) causal-lm-perplexity that no section .* add their benchmark"):
        reproduce.render(asr_section, docs)
    assert (docs / "results.md").read_text(encoding="utf-8") == report


@pytest.mark.parametrize("command", sorted({c for s in reproduce.SECTIONS.values() for c in s.commands}))
def test_every_command_runs_a_script_with_flags_it_defines(command):
    program, script, *arguments = command.split()
    source = (REPO / script).read_text(encoding="utf-8")
    assert program == "python"
    assert all(f'"{flag}"' in source for flag in arguments if flag.startswith("--"))


def test_run_sections_runs_each_command_once(tmp_path, monkeypatch):
    script = tmp_path / "fake_benchmark.py"
    log = tmp_path / "log.txt"
    script.write_text(f"import sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n", encoding="utf-8")
    shared = f"python {script} --phase train"
    sections = {
        name: reproduce.Section(name, "", {}, commands, render=lambda payloads, figures: {})
        for name, commands in (("a", (shared, f"python {script} --phase speed")), ("b", (shared,)))
    }
    monkeypatch.setattr(reproduce, "SECTIONS", sections)
    reproduce.run_sections(["a", "b"])
    assert log.read_text(encoding="utf-8").splitlines() == ["--phase train", "--phase speed"]
