"""benchmarks/projection_head.py: its summary is the runs' mean ± std with differences paired by seed, its verdict
follows the numbers, its rows without a head are the recipes benchmark's runs, and every block rendered into docs
equals a fresh rendering of the committed JSON."""

from __future__ import annotations

import json
import random
import statistics
import sys

import pytest

from tests.benchmark_testing import assert_documents_show, committed_results, load_benchmark

projection_head = load_benchmark("projection_head")
replace_blocks = sys.modules["recipes"].replace_blocks


def fake_results(seed: int = 0) -> dict:
    rng = random.Random(seed)
    results = {"baseline": {}, "runs": {}, "transfer": {}, "retrained_baselines": {}}
    for variant in projection_head.VARIANTS:
        for head in (False, True):
            for run_seed in range(3):
                key = projection_head.run_key(variant, head, run_seed)
                table = "runs" if head else "baseline"
                results[table][key] = {
                    "variant": variant,
                    "seed": run_seed,
                    "layer_accuracy": [rng.uniform(0.5, 0.9) for _ in range(6)],
                }
                pre = [rng.uniform(0.6, 0.9) for _ in range(7)]
                post = [rng.uniform(0.6, 0.9) for _ in range(7)] if head else pre
                results["transfer"][key] = {
                    "variant": variant,
                    "head": head,
                    "seed": run_seed,
                    "pre": pre,
                    "post": post,
                }
    return results


def test_summary_is_mean_and_std_over_seeds_and_differences_are_paired():
    results = fake_results()
    summary = projection_head.summarize(results)
    runs = [results["runs"][f"sst2/recommended+head/{seed}"] for seed in range(3)]
    for layer in range(6):
        values = [run["layer_accuracy"][layer] for run in runs]
        assert summary["accuracy"]["recommended+head"]["layer_accuracy"][layer] == pytest.approx(
            (statistics.mean(values), statistics.stdev(values))
        )
    transfer = results["transfer"]
    headed = [transfer[f"sst2/standard+head/{seed}"] for seed in range(3)]
    plain = [transfer[f"sst2/standard/{seed}"] for seed in range(3)]
    for layer in range(7):
        post = [run["post"][layer] for run in headed]
        assert summary["transfer"]["standard+head"]["post"][layer] == pytest.approx(
            (statistics.mean(post), statistics.stdev(post))
        )
        gaps = [run["pre"][layer] - run["post"][layer] for run in headed]
        assert summary["differences"]["standard: pre - post"][layer] == pytest.approx(
            (statistics.mean(gaps), statistics.stdev(gaps))
        )
        gaps = [a["pre"][layer] - b["pre"][layer] for a, b in zip(headed, plain)]
        assert summary["differences"]["standard: pre with head - without head"][layer][0] == pytest.approx(
            statistics.mean(gaps)
        )
    assert summary["transfer"]["standard"]["pre"] == summary["transfer"]["standard"]["post"]
    runs, plain_runs = results["runs"], results["baseline"]
    for layer in range(6):
        gaps = [
            runs[f"sst2/recommended+head/{seed}"]["layer_accuracy"][layer]
            - plain_runs[f"sst2/recommended/{seed}"]["layer_accuracy"][layer]
            for seed in range(3)
        ]
        assert summary["accuracy_differences"]["recommended: with head - without head"][layer] == pytest.approx(
            (statistics.mean(gaps), statistics.stdev(gaps))
        )


def test_verdict_follows_the_numbers():
    summary = {"differences": {"standard: pre - post": [(0.0, 0.0)] + [(0.02, 0.01)] * 4 + [(-0.03, 0.01)] * 2}}
    expected = (
        "standard fine-tuning: before the head beats after it by more than one std at 4 of 6 blocks, loses by more "
        "than one std at 2; mean difference over blocks +0.3 pt"
    )
    assert projection_head.verdict(summary) == expected + "."
    curve = [(0.8, 0.01)] * 7
    summary["transfer"] = {
        "standard+head": {"pre": [*curve[:2], (0.9, 0.0), *curve[3:]], "post": [*curve[:6], (0.85, 0)]}
    }
    assert projection_head.verdict(summary) == (
        expected + "; AG News is probed best at layer 2 before the head, 6 after it."
    )


def test_rendered_tables_show_the_summary_numbers():
    results = fake_results()
    results["summary"] = projection_head.summarize(results)
    table = projection_head.render_blocks(results)["projection-transfer"]
    mean, std = results["summary"]["transfer"]["recommended+head"]["post"][3]
    row = next(line for line in table.splitlines() if line.startswith("| aligned (library default) | yes | post"))
    assert row.split(" | ")[7] == f"{mean * 100:.1f} ± {std * 100:.1f}"
    assert table.endswith("Models without a head: the recipes benchmark's checkpoints.")
    retrained = {**results["baseline"]["sst2/standard/0"], "layer_accuracy": [0.5] * 5 + [0.8123]}
    results["retrained_baselines"]["sst2/standard/0"] = retrained
    last = results["baseline"]["sst2/standard/0"]["layer_accuracy"][-1]
    assert projection_head.render_blocks(results)["projection-transfer"].endswith(
        "except standard fine-tuning seed 0, retrained here with the same settings for its checkpoint: last-layer "
        f"SST-2 accuracy 81.2 (recipes.json: {last * 100:.1f})."
    )


def test_committed_documents_match_the_committed_results():
    results = committed_results("projection_head.json")
    blocks = projection_head.render_blocks(results)
    assert_documents_show(blocks, projection_head.RENDERED_DOCUMENTS, "run --phase render")
    assert json.loads(json.dumps(projection_head.summarize(results))) == results["summary"]


def test_rows_without_a_head_are_the_recipes_runs_with_the_same_settings():
    results = committed_results("projection_head.json")
    recipes = committed_results("recipes.json")["runs"]
    assert results["baseline"]
    for key, record in results["baseline"].items():
        assert record["layer_accuracy"] == recipes[key]["layer_accuracy"]
    for record in results["runs"].values():
        plain = recipes[f"sst2/{record['variant']}/{record['seed']}"]
        assert record["train_samples"] == plain["train_samples"]
        options = {name: value for name, value in record["options"].items() if name != "projection_head"}
        assert options == plain["options"]
        assert record["options"]["projection_head"] is not None
