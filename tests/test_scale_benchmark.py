"""benchmarks/scale.py: its memory count is exact on a known optimizer state, its summary follows the committed JSON,
and the blocks rendered into the docs equal a fresh rendering of that JSON."""

from __future__ import annotations

import pytest
import torch

from tests.benchmark_testing import assert_documents_show, committed_results, load_benchmark

scale = load_benchmark("scale")


def test_state_bytes_counts_parameters_gradients_and_adam_moments_once_each():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(3, 8)).sum().backward()
    optimizer.step()
    numel = sum(parameter.numel() for parameter in model.parameters())
    sizes = scale.state_bytes(model, optimizer)
    # AdamW: two fp32 moments per parameter and one fp32 step counter per parameter tensor.
    assert sizes == {"parameters": 4 * numel, "gradients": 4 * numel, "optimizer": 8 * numel + 4 * 4, "buffers": 0}


def test_views_into_one_flat_buffer_are_counted_once():
    flat = torch.zeros(100)

    class Holder:
        def __init__(self):
            self.partitions = [flat[:50], flat[50:]]
            self.grad_buckets = {"bucket": torch.zeros(10)}

    sizes = scale.state_bytes(torch.nn.Module(), Holder())
    assert sizes == {"parameters": 0, "gradients": 0, "optimizer": 400, "buffers": 40}


def test_summary_ratios_and_loss_differences_follow_the_committed_json():
    results = committed_results("scale.json")
    summary = scale.summarize(results)
    ddp = max(rank["state_bytes"]["total"] for rank in results["engines"]["ddp"]["ranks"])
    for engine, run in results["engines"].items():
        assert [rank["world_size"] for rank in run["ranks"]] == [2, 2], engine
        total = max(rank["state_bytes"]["total"] for rank in run["ranks"])
        assert summary[engine]["ratio"] == pytest.approx(total / ddp)
        for rank in run["ranks"]:
            sizes = rank["state_bytes"]
            assert sizes["total"] == sizes["parameters"] + sizes["gradients"] + sizes["optimizer"]
        assert summary[engine]["loss_difference"] <= 1e-4, engine  # every engine trains the same function


def test_rendered_blocks_match_the_committed_json():
    blocks = scale.render_blocks(committed_results("scale.json"))
    assert_documents_show(
        blocks, ("docs/distributed.md", "docs/results.md"), "run `python benchmarks/scale.py --phase render`"
    )
