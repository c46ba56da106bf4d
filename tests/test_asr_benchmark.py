"""benchmarks/asr.py: its summary is the runs' mean ± std with differences paired by seed, the SST-2 rows without ASR
come from the recipes benchmark, and every table rendered into the docs equals a fresh rendering of the committed JSON."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from tests.benchmark_testing import assert_documents_show, committed_results, load_benchmark

benchmark = load_benchmark("asr", "asr_benchmark")


def fake_run(rng: random.Random, task: str, variant: str, seed: int) -> dict:
    accuracy = sorted(rng.uniform(0.5, 0.95) for _ in range(6))
    run = {"task": task, "variant": variant, "seed": seed, "layer_accuracy": accuracy}
    if variant.endswith("_asr"):
        run["reloaded_layer_accuracy"] = [value + rng.choice([0.0, 0.0, 0.002]) for value in accuracy]
        if seed > 0:  # the first SST-2 ASR runs predate the measurement
            run["asr_scale_deviation"] = {"mean": rng.uniform(0, 0.1), "max": rng.uniform(0.1, 0.5)}
    return run


def fake_results(seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)
    runs = {
        f"{task}/{variant}/{run_seed}": fake_run(rng, task, variant, run_seed)
        for task, variants in benchmark.TASK_VARIANTS.items()
        for variant in variants
        for run_seed in range(3)
    }
    recipes = {
        "runs": {
            f"sst2/{variant}/{run_seed}": {
                **fake_run(rng, "sst2", variant, run_seed),
                "train_samples": benchmark.SST2_SAMPLES if variant != "paper" else 1,
            }
            for variant in ("standard", "recommended", "paper")
            for run_seed in range(3)
        }
    }
    return {"runs": runs}, recipes


def test_summary_is_mean_and_std_and_asr_differences_are_paired_by_seed():
    results, recipes = fake_results()
    summary = benchmark.summarize(results, recipes)
    runs = [results["runs"][f"digits/aligned_asr/{seed}"] for seed in range(3)]
    without = [results["runs"][f"digits/aligned/{seed}"] for seed in range(3)]
    entry = summary["digits"]["aligned_asr"]
    for layer in range(6):
        values = [run["layer_accuracy"][layer] for run in runs]
        assert entry["layer_accuracy"][layer] == pytest.approx((statistics.mean(values), statistics.stdev(values)))
    gaps = [run["layer_accuracy"][-1] - base["layer_accuracy"][-1] for run, base in zip(runs, without)]
    assert entry["last_layer_vs_without"] == pytest.approx((statistics.mean(gaps), statistics.stdev(gaps)))
    middle = [run["layer_accuracy"][2] - base["layer_accuracy"][2] for run, base in zip(runs, without)]
    assert entry["middle_layer_vs_without"][0] == pytest.approx(statistics.mean(middle))
    changes = [abs(a - b) for run in runs for a, b in zip(run["layer_accuracy"], run["reloaded_layer_accuracy"])]
    assert entry["reloaded_max_accuracy_change"] == pytest.approx(max(changes))
    assert "last_layer_vs_without" not in summary["digits"]["aligned"]
    deviations = [run["asr_scale_deviation"] for run in runs[1:]]
    assert entry["asr_scale_deviation"]["runs"] == 2
    assert entry["asr_scale_deviation"]["mean"][0] == pytest.approx(statistics.mean(d["mean"] for d in deviations))
    assert entry["asr_scale_deviation"]["max"] == max(d["max"] for d in deviations)


def test_sst2_rows_without_asr_are_the_recipes_runs_of_the_same_settings():
    results, recipes = fake_results()
    summary = benchmark.summarize(results, recipes)
    aligned = [recipes["runs"][f"sst2/recommended/{seed}"]["layer_accuracy"][-1] for seed in range(3)]
    assert summary["sst2"]["aligned"]["layer_accuracy"][-1][0] == pytest.approx(statistics.mean(aligned))
    assert summary["sst2"]["aligned"]["source"] == "benchmarks/results/recipes.json"
    assert summary["sst2"]["aligned_asr"]["source"] == "this benchmark"
    asr = [results["runs"][f"sst2/aligned_asr/{seed}"]["layer_accuracy"][-1] for seed in range(3)]
    gaps = [a - b for a, b in zip(asr, aligned)]
    assert summary["sst2"]["aligned_asr"]["last_layer_vs_without"][0] == pytest.approx(statistics.mean(gaps))
    # A recipes run of other settings (here: another training-set size) is not taken.
    recipes["runs"]["sst2/recommended/0"]["train_samples"] = 10
    assert benchmark.summarize(results, recipes)["sst2"]["aligned"]["seeds"] == [1, 2]


def test_rendered_tables_show_the_summary_numbers():
    results, recipes = fake_results()
    results["summary"] = benchmark.summarize(results, recipes)
    results["timing"] = {
        "digits/aligned": {
            "step_time_ratio": 1.234,
            "inference_time_ratio_folded": 1.01,
            "inference_time_ratio_unfolded": 1.2,
            "inference_time_ratio_control": 0.99,
            "asr_parameters": 10,
            "parameters": 1000,
        }
    }
    blocks = benchmark.render_blocks(results)
    mean, std = results["summary"]["digits"]["standard_asr"]["layer_accuracy"][2]
    row = next(line for line in blocks["asr-accuracy-digits"].splitlines() if line.startswith("| standard + ASR |"))
    assert row.split(" | ")[4] == f"{mean * 100:.1f} ± {std * 100:.1f}"
    effects = next(line for line in blocks["asr-effects"].splitlines() if line.startswith("| digits ViT | aligned"))
    assert "| 1.234 | 1.010 | 1.200 | 0.990 | 1.0% of the model | " in effects
    assert effects.endswith("(2 of 3 seeds) |")


def test_committed_documents_match_the_committed_results():
    results = committed_results("asr.json")
    assert_documents_show(benchmark.render_blocks(results), benchmark.RENDERED_DOCUMENTS, "run --phase render")
    recipes = committed_results("recipes.json")
    assert json.loads(json.dumps(benchmark.summarize(results, recipes))) == results["summary"]
