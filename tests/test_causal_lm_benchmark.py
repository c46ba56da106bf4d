"""benchmarks/causal_lm.py: its summary and targets follow the numbers, and the tables rendered into README and
docs/causal_lm.md equal a fresh rendering of the committed JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "causal_lm.json"


def load_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("causal_lm_benchmark", REPO / "benchmarks" / "causal_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_benchmark()


def fake_results() -> dict:
    def run(perplexities, peak, before, step):
        return {
            "layer_perplexity": perplexities,
            "layer_agreement": [0.2, 0.5, 1.0],
            "peak_rss_bytes": peak,
            "rss_before_training_bytes": before,
            "median_step_time_s": step,
        }

    def speed(speedups, helper, identical=(True, True)):
        return {
            "speedup": speedups,
            "speedup_helper_drafts": helper,
            "identical": list(identical),
            "acceptance": [0.4, 0.8],
        }

    return {
        "runs": {"standard": run([90.0, 60.0, 40.0], 1000, 600, 1.0), "aligned": run([50, 45, 41.0], 1100, 600, 1.5)},
        "speed": {"standard": speed([0.6, 0.9], [0.7, 1.1]), "aligned": speed([1.2, 1.6], [1.4, 1.3])},
    }


def test_summary_and_targets_follow_the_numbers():
    results = fake_results()
    summary = benchmark.summarize(results)
    assert summary["perplexity_gap"] == pytest.approx(41 / 40 - 1)
    assert summary["memory_ratio"] == pytest.approx(1.1)
    assert summary["training_memory_ratio"] == pytest.approx(500 / 400)
    assert (summary["best_k"], summary["best_drafts"], summary["speedup"]) == (2, "default", 1.6)
    assert (summary["standard_speedup_same_setting"], summary["standard_best_speedup"]) == (0.9, 1.1)
    checks = benchmark.targets(summary)
    assert [check["met"] for check in checks.values()] == [True, True, True]
    results["speed"]["aligned"]["identical"] = [True, False]
    assert not list(benchmark.targets(benchmark.summarize(results)).values())[2]["met"]  # fast but not identical


def test_rendered_tables_show_the_numbers():
    results = fake_results()
    results["summary"] = benchmark.summarize(results)
    results["targets"] = benchmark.targets(results["summary"])
    blocks = benchmark.render_blocks(results)
    assert "| 3 | 40.0 | 1.000 | 41.0 | 1.000 |" in blocks["causal-lm-layers"]
    assert "| 2 | 0.800 | 0.90x / 1.10x | 0.800 | 1.60x / 1.30x | yes |" in blocks["causal-lm-speed"]
    assert "| +2.5% | yes |" in blocks["causal-lm-targets"]


def test_committed_documents_match_the_committed_results():
    """A number typed into README or docs by hand, or JSON changed without re-rendering, fails here."""
    if not RESULTS.exists():
        pytest.skip("benchmarks/results/causal_lm.json is not committed yet")
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    blocks = benchmark.render_blocks(results)
    for name in benchmark.RENDERED_DOCUMENTS:
        text = (REPO / name).read_text(encoding="utf-8")
        assert benchmark.replace_blocks(text, blocks) == text, f"{name} is out of date: rerun benchmarks/causal_lm.py"
    assert json.loads(json.dumps(benchmark.summarize(results))) == results["summary"]
    assert benchmark.targets(results["summary"]) == results["targets"]
