"""benchmarks/calibration.py: its vectorized draws choose what `calibrate_exits` chooses on the same samples, its
summary takes the worst seed for shares and mean ± std otherwise, and the rendered docs equal the committed JSON."""

from __future__ import annotations

import numpy as np
import pytest

from hf_aligned import calibrate_exits, simulate_exits
from tests.benchmark_testing import assert_documents_show, committed_results, load_benchmark
from tests.test_calibration import synthetic_logits

benchmark = load_benchmark("calibration", "calibration_benchmark")


@pytest.fixture(scope="module")
def pool():
    """A synthetic pool, every grid setting applied to it once, and two calibration draws evaluated."""
    layer_logits, labels = synthetic_logits(num_samples=600, seed=11)
    outcomes = benchmark.Outcomes(layer_logits.numpy(), labels.numpy())
    masks = benchmark.draw_masks(600, 250, draws=2, seed=4)
    results, _ = benchmark.evaluate_draws(outcomes, masks, 1.0 - masks, epsilon=0.05, delta=0.1)
    return layer_logits, labels, masks, results


@pytest.mark.parametrize("rule", ["confidence", "margin", "agreement", "patience"])
def test_vectorized_draws_choose_what_calibrate_exits_chooses(rule, pool):
    layer_logits, labels, masks, results = pool
    assert (masks.sum(axis=1) == 250).all()
    for draw, mask in enumerate(masks.astype(bool)):
        rest = ~mask
        for method, risk in (("ltt", "consistency"), ("ltt", "accuracy")):
            expected = calibrate_exits(
                layer_logits=layer_logits[:, mask], labels=labels[mask], max_accuracy_drop=0.05, risk=risk, rule=rule
            )
            values = results[benchmark.method_key(method, risk, rule)]
            chosen = values["chosen"][draw]
            assert (None if np.isnan(chosen) else chosen) == expected.chosen
            # The realized drop is measured on the rest of the pool with the chosen setting.
            config = expected.to_exit_config()
            logits, layers = simulate_exits(layer_logits[:, rest], config)
            truth = labels[rest]
            full = (layer_logits[-1, rest].argmax(-1) == truth).float().mean().item()
            drop = full - (logits.argmax(-1) == truth).float().mean().item()
            assert values["drop"][draw] == pytest.approx(drop, abs=1e-6)
            assert values["ideal_speedup"][draw] == pytest.approx(4 / layers.float().mean().item(), rel=1e-5)


def test_empirical_draws_choose_what_the_empirical_method_chooses_on_the_grid():
    layer_logits, labels = synthetic_logits(num_samples=600, seed=12)
    outcomes = benchmark.Outcomes(layer_logits.numpy(), labels.numpy())
    masks = benchmark.draw_masks(600, 200, draws=2, seed=5)
    results, _ = benchmark.evaluate_draws(outcomes, masks, 1.0 - masks, epsilon=0.02, delta=0.1)
    grid = benchmark.calibration_grid("confidence", 4)
    for draw, mask in enumerate(masks.astype(bool)):
        expected = calibrate_exits(
            layer_logits=layer_logits[:, mask],
            labels=labels[mask],
            max_accuracy_drop=0.02,
            method="empirical",
            risk="accuracy",
            rule="confidence",
            thresholds=grid,
        )
        assert results["empirical/accuracy/confidence"]["chosen"][draw] == expected.chosen


def fake_record(rng: np.random.Generator) -> dict:
    def method() -> dict:
        return {
            "share_drop_above_epsilon": float(rng.uniform(0, 0.2)),
            "share_disagreement_above_epsilon": float(rng.uniform(0, 0.2)),
            "share_pool_risk_above_epsilon": float(rng.uniform(0, 0.2)),
            "mean_drop": float(rng.uniform(-0.01, 0.01)),
            "mean_ideal_speedup": float(rng.uniform(1, 3)),
            "chosen_counts": {"0.9": 3, "0.95": 2},
        }

    keys = [benchmark.method_key(*entry) for entry in benchmark.METHODS]
    return {"sizes": {"1000": {"oracle_speedup": float(rng.uniform(2, 4)), "methods": {k: method() for k in keys}}}}


def test_summary_takes_the_worst_seed_for_shares_and_weights_measured_speed_by_draws():
    rng = np.random.default_rng(0)
    runs = {f"sst2/recommended/{seed}": fake_record(rng) for seed in range(3)}
    timed = {"confidence:0.9": {"measured_speedup": 1.8, "ideal_speedup": 2.0},
             "confidence:0.96": {"measured_speedup": 1.2, "ideal_speedup": 1.5}}  # fmt: skip
    speed = {key: {"settings": timed} for key in runs}
    summary = benchmark.summarize({"runs": runs, "speed": speed})
    key = benchmark.method_key("ltt", "consistency", "confidence")
    entry = summary["sst2"]["recommended"]["1000"][key]
    shares = [
        runs[f"sst2/recommended/{seed}"]["sizes"]["1000"]["methods"][key]["share_drop_above_epsilon"]
        for seed in range(3)
    ]
    assert entry["worst_share_drop_above_epsilon"] == max(shares)
    speeds = [
        runs[f"sst2/recommended/{seed}"]["sizes"]["1000"]["methods"][key]["mean_ideal_speedup"] for seed in range(3)
    ]
    assert entry["ideal_speedup"] == pytest.approx([np.mean(speeds), np.std(speeds, ddof=1)])
    # Each draw takes the measured/ideal efficiency of the timed threshold nearest to its own (0.95 -> 0.96).
    efficiency = (3 * 1.8 / 2.0 + 2 * 1.2 / 1.5) / 5
    assert entry["measured_speedup"][0] == pytest.approx(np.mean(speeds) * efficiency)
    assert summary["sst2"]["recommended"]["1000"][key]["seeds"] == 3


def test_rendered_documents_equal_the_committed_json():
    results = committed_results("calibration.json")
    assert results["summary"] == benchmark.summarize(results)
    assert results["targets"] == benchmark.targets(results["summary"])
    assert_documents_show(
        benchmark.render_blocks(results),
        benchmark.RENDERED_DOCUMENTS,
        "run `python benchmarks/calibration.py --phase render`",
    )


def test_draws_select_distinct_items_and_differ_from_each_other():
    masks = benchmark.draw_masks(50, 20, draws=10, seed=1)
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert (masks.sum(axis=1) == 20).all()
    assert len({tuple(row) for row in masks}) == 10
