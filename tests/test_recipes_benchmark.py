"""benchmarks/recipes.py: its summary is the runs' mean ± std, its targets follow the numbers, and every table rendered
into README and docs equals a fresh rendering of the committed JSON."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from tests.benchmark_testing import assert_documents_show, committed_results, load_benchmark

recipes = load_benchmark("recipes")


def fake_run(rng: random.Random, task: str, variant: str, seed: int, layers: int = 6) -> dict:
    run = {
        "task": task,
        "variant": variant,
        "seed": seed,
        "train_samples": 100 if task == "sst2" else 80,
        "layer_accuracy": sorted(rng.uniform(0.5, 0.95) for _ in range(layers)),
        "median_step_time_s": rng.uniform(0.5, 1.5),
        "peak_rss_bytes": rng.randint(10**9, 2 * 10**9),
        "options": {"layer_weights": "linear"},
    }
    if variant != "standard":
        run["early_exit"] = {
            "accuracy_drop": rng.uniform(-0.01, 0.02),
            "mean_exit_layer": rng.uniform(1, layers),
            "ideal_speedup": rng.uniform(1, 3),
        }
        run["speed"] = {"measured_speedup_batch32": rng.uniform(1, 3)}
    return run


def fake_results(seed: int = 0) -> dict:
    rng = random.Random(seed)
    runs = {
        f"{task}/{variant}/{run_seed}": fake_run(rng, task, variant, run_seed)
        for task in ("sst2", "ag_news")
        for variant in ("standard", "paper", "recommended")
        for run_seed in range(3)
    }
    return {"runs": runs}


def test_summary_is_mean_and_std_over_seeds_and_costs_are_paired_by_seed():
    results = fake_results()
    summary = recipes.summarize(results)
    runs = [results["runs"][f"sst2/recommended/{seed}"] for seed in range(3)]
    standard = [results["runs"][f"sst2/standard/{seed}"] for seed in range(3)]
    entry = summary["sst2"]["recommended"]
    for layer in range(6):
        values = [run["layer_accuracy"][layer] for run in runs]
        assert entry["layer_accuracy"][layer] == pytest.approx((statistics.mean(values), statistics.stdev(values)))
    ratios = [run["median_step_time_s"] / base["median_step_time_s"] for run, base in zip(runs, standard)]
    assert entry["step_time_vs_standard"] == pytest.approx((statistics.mean(ratios), statistics.stdev(ratios)))
    gaps = [run["layer_accuracy"][-1] - base["layer_accuracy"][-1] for run, base in zip(runs, standard)]
    assert entry["last_layer_vs_standard"][0] == pytest.approx(statistics.mean(gaps))
    speeds = [run["speed"]["measured_speedup_batch32"] for run in runs]
    assert entry["early_exit"]["measured_speedup_batch32"][0] == pytest.approx(statistics.mean(speeds))
    assert "early_exit" not in summary["sst2"]["standard"]


def test_targets_follow_the_numbers():
    results = fake_results()
    summary = recipes.summarize(results)
    entry = summary["sst2"]["recommended"]
    entry["last_layer_vs_standard"] = (-0.002, 0.0)
    entry["layer_accuracy"] = [(0.8, 0.0)] * 2 + [(0.85, 0.0), (0.86, 0.0), (0.87, 0.0), (0.88, 0.0)]
    entry["step_time_vs_standard"] = (1.2, 0.0)
    entry["early_exit"].update(measured_speedup_batch32=(2.1, 0.0), accuracy_drop=(0.011, 0.0))
    checks = recipes.targets(summary)["sst2"]
    assert checks["last layer >= standard - 0.3 pt"]["met"]
    assert not checks["layer 3 within 2 pt of layer 6"]["met"]  # 0.88 - 0.85 = 3 points
    assert checks["layer 3 within 2 pt of layer 6"]["value"] == pytest.approx(0.03)
    assert not checks["step time <= 1.10x standard"]["met"]
    assert not checks["early exit >= 2.0x at <= 1 pt drop"]["met"]  # fast enough, but 1.1 points lost


def test_blocks_are_replaced_in_place_and_unbalanced_markers_are_errors():
    text = "a\n<!-- BEGIN x -->\nold\n<!-- END x -->\nb\n<!-- BEGIN x -->\n<!-- END x -->\n"
    assert recipes.replace_blocks(text, {"x": "new"}) == (
        "a\n<!-- BEGIN x -->\nnew\n<!-- END x -->\nb\n<!-- BEGIN x -->\nnew\n<!-- END x -->\n"
    )
    assert recipes.replace_blocks("no markers", {"x": "new"}) == "no markers"
    with pytest.raises(ValueError, match="<!-- BEGIN x --> has no <!-- END x -->"):
        recipes.replace_blocks("<!-- BEGIN x -->", {"x": "new"})


def test_rendered_tables_show_the_summary_numbers():
    results = fake_results()
    results["summary"] = recipes.summarize(results)
    results["targets"] = recipes.targets(results["summary"])
    table = recipes.render_blocks(results)["recipes-accuracy-ag_news"]
    mean, std = results["summary"]["ag_news"]["paper"]["layer_accuracy"][2]
    row = next(line for line in table.splitlines() if line.startswith("| aligned, paper's loss"))
    assert row.split(" | ")[4] == f"{mean * 100:.1f} ± {std * 100:.1f}"
    setup = recipes.render_blocks(results)["recipes-setup"]
    assert setup.startswith("One epoch on 100 SST-2 phrases (seeds 0, 1, 2) and on 80 AG News items (seeds 0, 1, 2);")
    results["runs"]["sst2/paper/1"]["train_samples"] = 99
    with pytest.raises(ValueError, match=r"sst2 runs trained on different numbers of examples \[99, 100\]"):
        recipes.render_blocks(results)


def test_committed_documents_match_the_committed_results():
    """A number typed into README or docs by hand, or JSON changed without re-rendering, fails here."""
    results = committed_results("recipes.json")
    blocks = recipes.render_blocks(results)
    assert_documents_show(blocks, recipes.RENDERED_DOCUMENTS, "run --phase render")
    # The summary stored in the JSON is the one its runs give.
    assert json.loads(json.dumps(recipes.summarize(results))) == results["summary"]
