"""benchmarks/causal_lm.py: its summary and targets follow the numbers, and the tables rendered into README and
docs/causal_lm.md equal a fresh rendering of the committed JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.benchmark_testing import assert_documents_show, committed_results, load_benchmark

benchmark = load_benchmark("causal_lm", "causal_lm_benchmark")


PERPLEXITY = {  # per (variant, seed): every layer's perplexity
    ("standard", 0): [90.0, 60.0, 40.0],
    ("standard", 1): [92.0, 62.0, 42.0],
    ("standard", 2): [94.0, 58.0, 38.0],
    ("aligned", 0): [50.0, 45.0, 41.0],
    ("aligned", 1): [52.0, 44.0, 42.0],
    ("aligned", 2): [48.0, 46.0, 36.0],
}
PEAK = {"standard": 1000, "aligned": 1100}
STEP = {"standard": 1.0, "aligned": 1.5}


def fake_results(seeds=(0, 1, 2)) -> dict:
    def run(variant, seed):
        return {
            "variant": variant,
            "seed": seed,
            "layer_perplexity": PERPLEXITY[variant, seed],
            "layer_agreement": [0.2 + 0.1 * seed, 0.5, 1.0],
            "peak_rss_bytes": PEAK[variant] + 100 * seed,
            "rss_before_training_bytes": 600,
            "median_step_time_s": STEP[variant] * (1 + seed),
        }

    def speed(speedups, helper, identical=(True, True)):
        return {
            "speedup": speedups,
            "speedup_helper_drafts": helper,
            "identical": list(identical),
            "acceptance": [0.4, 0.8],
        }

    return {
        "runs": {f"{variant}/{seed}": run(variant, seed) for variant in ("standard", "aligned") for seed in seeds},
        "speed": {
            "standard": speed([0.6, 0.9], [0.7, 1.1]),
            "aligned": speed([1.2, 1.6], [1.4, 1.3]),
            "seed": 0,
            "prompts": 6,
            "repeats": 5,
        },
    }


def test_summary_is_the_mean_and_std_over_seeds_and_pairs_ratios_by_seed():
    results = fake_results()
    summary = benchmark.summarize(results)
    assert summary["seeds"] == [0, 1, 2]
    for variant in ("standard", "aligned"):
        perplexity = np.array([PERPLEXITY[variant, seed] for seed in range(3)])
        means, stds = np.array(summary["layers"][variant]["layer_perplexity"]).T
        np.testing.assert_allclose(means, perplexity.mean(axis=0))
        np.testing.assert_allclose(stds, perplexity.std(axis=0, ddof=1))
        agreement = np.array(summary["layers"][variant]["layer_agreement"])
        np.testing.assert_allclose(agreement[0], [0.3, 0.1])  # 0.2, 0.3, 0.4
        np.testing.assert_allclose(agreement[2], [1.0, 0.0])
    gaps = [41 / 40 - 1, 42 / 42 - 1, 36 / 38 - 1]
    assert summary["per_seed"]["perplexity_gap"] == pytest.approx(gaps)
    assert summary["perplexity_gap"] == pytest.approx(sum(gaps) / 3)  # the mean of the per-seed gaps
    assert summary["per_seed"]["memory_ratio"] == pytest.approx([1100 / 1000, 1200 / 1100, 1300 / 1200])
    assert summary["training_memory_ratio"] == pytest.approx((500 / 400 + 600 / 500 + 700 / 600) / 3)
    assert summary["per_seed"]["step_time_ratio"] == pytest.approx([1.5, 1.5, 1.5])  # paired: 1.5/1, 3/2, 4.5/3
    assert (summary["best_k"], summary["best_drafts"], summary["speedup"]) == (2, "default", 1.6)
    assert (summary["standard_speedup_same_setting"], summary["standard_best_speedup"]) == (0.9, 1.1)
    checks = benchmark.targets(summary)
    assert [check["met"] for check in checks.values()] == [True, True, True]
    results["speed"]["aligned"]["identical"] = [True, False]
    assert not list(benchmark.targets(benchmark.summarize(results)).values())[2]["met"]  # fast but not identical


def test_summary_uses_only_seeds_trained_for_both_variants():
    results = fake_results()
    del results["runs"]["aligned/2"]
    summary = benchmark.summarize(results)
    assert summary["seeds"] == [0, 1]
    assert summary["per_seed"]["perplexity_gap"] == pytest.approx([41 / 40 - 1, 0.0])
    assert summary["layers"]["standard"]["layer_perplexity"][0] == pytest.approx([91.0, 2**0.5])
    with pytest.raises(ValueError, match="no seed trained for both variants"):
        benchmark.summarize({"runs": {"standard/0": results["runs"]["standard/0"]}})


def test_the_one_seed_layout_migrates_with_its_numbers_and_provenance():
    record = {"layer_perplexity": [9.0], "provenance": {"command": "python benchmarks/causal_lm.py"}}
    old = {"runs": {"standard": dict(record), "aligned": dict(record)}, "setup": {"seed": 0}, "speed": {}}
    results = benchmark.migrate(old)
    assert results["runs"] == {
        "standard/0": {**record, "variant": "standard", "seed": 0},
        "aligned/0": {**record, "variant": "aligned", "seed": 0},
    }
    assert results["speed"]["seed"] == 0 and "seed" not in results["setup"]
    assert benchmark.migrate(results) == results  # already migrated: unchanged


def test_rendered_tables_show_the_numbers():
    results = fake_results()
    results["summary"] = benchmark.summarize(results)
    results["targets"] = benchmark.targets(results["summary"])
    blocks = benchmark.render_blocks(results)
    assert "Mean ± std over seeds 0, 1, 2:" in blocks["causal-lm-layers"]
    assert "| 3 | 40.0 ± 2.0 | 1.000 ± 0.000 | 39.7 ± 3.2 | 1.000 ± 0.000 |" in blocks["causal-lm-layers"]
    assert "| 2 | 0.800 | 0.90x / 1.10x | 0.800 | 1.60x / 1.30x | yes |" in blocks["causal-lm-speed"]
    assert "seed-0 models only" in blocks["causal-lm-speed"]
    assert "| -0.9% (+2.5%, +0.0%, -5.3%) | yes |" in blocks["causal-lm-targets"]


def test_committed_documents_match_the_committed_results():
    """A number typed into README or docs by hand, or JSON changed without re-rendering, fails here."""
    results = committed_results("causal_lm.json")
    blocks = benchmark.render_blocks(results)
    assert_documents_show(blocks, benchmark.RENDERED_DOCUMENTS, "rerun benchmarks/causal_lm.py")
    assert json.loads(json.dumps(benchmark.summarize(results))) == results["summary"]
    assert benchmark.targets(results["summary"]) == results["targets"]
