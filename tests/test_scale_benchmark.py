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


def test_a_copy_held_only_inside_the_innermost_step_counts_in_step_not_between_steps():
    # DeepSpeed's shape: accelerate's wrapper -> DeepSpeed's optimizer -> the torch optimizer it steps, with a flat
    # gradient copy that exists only while the torch optimizer steps.
    model = torch.nn.Linear(8, 4)
    adam = torch.optim.AdamW(model.parameters())

    class Engine:
        def __init__(self):
            self.optimizer = adam
            self.flat_grad = None

        def step(self):
            self.flat_grad = torch.zeros(1000)
            self.optimizer.step()
            self.flat_grad = None

    class Wrapper:
        def __init__(self):
            self.optimizer = Engine()

    wrapper = Wrapper()
    meter = scale.StateMeter()
    meter.on_train_begin(None, None, None, model=model, optimizer=wrapper)
    model(torch.ones(2, 8)).sum().backward()
    wrapper.optimizer.step()
    numel = sum(parameter.numel() for parameter in model.parameters())
    moments = 8 * numel + 4 * 2  # two fp32 moments per parameter, one fp32 step counter per tensor
    assert meter.peaks["gradients"] == 4 * numel
    assert meter.in_step["gradients"] == 4 * numel + 4000
    assert meter.peaks["total"] == 4 * numel + 4 * numel + moments
    assert meter.in_step["total"] == meter.peaks["total"] + 4000


def test_summary_ratios_and_loss_differences_follow_the_committed_json():
    results = committed_results("scale.json")
    summary = scale.summarize(results)
    assert list(results["precisions"]) == ["fp32", "bf16"]
    for precision, engines in results["precisions"].items():
        assert list(engines) == list(scale.ENGINES), precision
        ddp = max(rank["state_bytes"]["total"] for rank in engines["ddp"]["ranks"])
        ddp_in_step = max(rank["state_bytes_in_step"]["total"] for rank in engines["ddp"]["ranks"])
        for engine, run in engines.items():
            row = summary[precision][engine]
            assert [rank["world_size"] for rank in run["ranks"]] == [2, 2], engine
            total = max(rank["state_bytes"]["total"] for rank in run["ranks"])
            in_step = max(rank["state_bytes_in_step"]["total"] for rank in run["ranks"])
            assert row["ratio"] == pytest.approx(total / ddp)
            assert row["in_step_ratio"] == pytest.approx(in_step / ddp_in_step)
            assert row["bytes_per_parameter"] == pytest.approx(total / run["ranks"][0]["num_parameters"])
            for rank in run["ranks"]:
                sizes, in_step = rank["state_bytes"], rank["state_bytes_in_step"]
                assert sizes["total"] == sizes["parameters"] + sizes["gradients"] + sizes["optimizer"]
                # inside the step each kind peaks at its own moment: the largest sum is at most the sum of peaks
                assert (
                    sizes["total"]
                    <= in_step["total"]
                    <= in_step["parameters"] + in_step["gradients"] + in_step["optimizer"]
                )


@pytest.mark.parametrize(
    ("precision", "mixed_precision", "dtypes", "tolerance"),
    [
        # every engine trains the same function
        ("fp32", "no", {"ddp": "float32", "deepspeed_zero2": "float32", "deepspeed_zero3": "float32"}, 1e-4),
        # DDP autocasts from fp32 weights, DeepSpeed computes with bf16 weights: close, not equal
        ("bf16", "bf16", {"ddp": "float32", "deepspeed_zero2": "bfloat16", "deepspeed_zero3": "bfloat16"}, 1e-3),
    ],
)
def test_each_precision_ran_as_stated_and_its_losses_stay_close_to_ddp(precision, mixed_precision, dtypes, tolerance):
    results = committed_results("scale.json")
    for engine, run in results["precisions"][precision].items():
        for rank in run["ranks"]:
            assert rank["mixed_precision"] == mixed_precision, engine
            assert rank["parameter_dtype"] == f"torch.{dtypes[engine]}", engine
        assert scale.summarize(results)[precision][engine]["loss_difference"] <= tolerance, engine
    assert ("--bf16" in results["precisions"][precision]["ddp"]["command"]) == (precision == "bf16")


def test_the_verdict_follows_the_ratios_for_each_precision():
    results = committed_results("scale.json")
    summary = scale.summarize(results)
    text = scale.render_blocks(results)["scale_memory"]
    for precision in ("fp32", "bf16"):
        zero3 = summary[precision]["deepspeed_zero3"]
        line = next(line for line in text.splitlines() if line.startswith(f"- {precision}: "))
        for where, ratio in (("between steps", zero3["ratio"]), ("inside the step", zero3["in_step_ratio"])):
            assert f"{ratio:.2f} of DDP's {where}" in line
            assert f"{'met' if ratio <= scale.TARGET else 'missed'} {where}" in line


def test_rendered_blocks_match_the_committed_json():
    blocks = scale.render_blocks(committed_results("scale.json"))
    assert_documents_show(
        blocks, ("docs/distributed.md", "docs/results.md"), "run `python benchmarks/scale.py --phase render`"
    )
