"""Scale benchmark: memory per process of an aligned causal LM trained on 2 CPU processes with DDP, DeepSpeed ZeRO-2
and ZeRO-3 (the configs of examples/accelerate/), through `accelerate launch` and `AlignedTrainer`.

The model is large enough that the training state dominates: a Llama-style AlignedForCausalLM with 8 blocks of width
512 (intermediate 1376, 8 heads, vocabulary 2048: 27.4M parameters), AdamW, 4 steps of 2 sequences of 64 tokens per
process, fp32. Every process measures, before and after each optimizer step (also from inside the optimizer's
`step`, where DeepSpeed's gradient partitions are alive), the bytes of the tensors it holds:

- parameters: the model's parameters (under ZeRO-3 the local partition `ds_tensor`, the parameters themselves are
  empty between uses);
- gradients: the parameters' `.grad` and the gradient buffers the DeepSpeed optimizer keeps (attributes named `grad`);
- optimizer: every other tensor the optimizer object reaches (AdamW's moments; DeepSpeed's flat fp32 partitions);
- apart from the state: the communication buffers DeepSpeed allocates up front (its reduce buckets, attributes named
  `bucket`: ZeRO-3's default holds 5e8 elements, mostly never touched, so it barely shows in resident memory);

each storage counted once, the maximum over the steps kept, and the peak resident memory of the process (`ru_maxrss`,
which includes the ~0.7 GB of the imported libraries). Results go to benchmarks/results/scale.json; `--phase render`
writes the table into docs/distributed.md and docs/results.md (`benchmarks/reproduce.py` renders the latter whole).

    nice -n 5 python benchmarks/scale.py                 # the three launches (about 2 minutes), then render
    python benchmarks/scale.py --phase render
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, describe_machine, print_table, write_json
from recipes import write_blocks
from transformers import TrainerCallback

RESULTS = REPO / "benchmarks" / "results" / "scale.json"
DOCUMENTS = ("docs/distributed.md", "docs/results.md")
ENGINES = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
MODEL = {
    "vocab_size": 2048,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
STEPS, BATCH, SEQUENCE = 4, 2, 64
TARGET = 0.6  # ZeRO-3 state per process, as a fraction of DDP's
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one process of a launch
# ----------------------------------------------------------------------------------------------------------------------


def _tensors(obj, path: str, depth: int, seen: set[int]):
    """(attribute path, tensor) for every tensor reachable from `obj` through containers and plain objects."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth == 0 or id(obj) in seen or isinstance(obj, (torch.nn.Module, type, str, bytes)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(f"{path}.{key}" if isinstance(key, str) else path, value) for key, value in obj.items()]
    elif isinstance(obj, (list, tuple, set)):
        items = [(path, value) for value in obj]
    elif hasattr(obj, "__dict__"):
        items = [(f"{path}.{name}", value) for name, value in vars(obj).items()]
    else:
        return
    for item_path, value in items:
        yield from _tensors(value, item_path, depth - 1, seen)


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of the parameters, gradients and optimizer state this process holds, each storage counted once, and
    apart from them the communication buffers DeepSpeed allocates (`buffers`: its reduce buckets)."""
    counted: set[int] = set()
    totals = {"parameters": 0, "gradients": 0, "optimizer": 0, "buffers": 0}

    def add(kind: str, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in counted:
            counted.add(storage.data_ptr())
            totals[kind] += storage.nbytes()

    for parameter in model.parameters():
        add("parameters", getattr(parameter, "ds_tensor", parameter))
    for parameter in model.parameters():
        if parameter.grad is not None:
            add("gradients", parameter.grad)
    for path, tensor in _tensors(optimizer, "optimizer", depth=6, seen=set()):
        kind = "buffers" if "bucket" in path.lower() else "gradients" if "grad" in path.lower() else "optimizer"
        add(kind, tensor)
        if tensor.grad is not None:
            add("gradients", tensor.grad)
    return totals


class StateMeter(TrainerCallback):
    """Keeps the largest `state_bytes` (and their sum, `total`) seen before and after every optimizer step."""

    def __init__(self):
        self.peaks = {"parameters": 0, "gradients": 0, "optimizer": 0, "buffers": 0, "total": 0}

    def record(self, model, optimizer) -> None:
        sizes = state_bytes(model, optimizer)
        sizes["total"] = sizes["parameters"] + sizes["gradients"] + sizes["optimizer"]
        for key, value in sizes.items():
            self.peaks[key] = max(self.peaks[key], value)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # accelerate runs DeepSpeed's step inside `backward`, where ZeRO-2's gradient partition lives: the optimizer's
        # own step is measured from inside, before and after.
        inner = getattr(optimizer, "optimizer", optimizer)
        original = inner.step

        def step(*step_args, **step_kwargs):
            self.record(model, optimizer)
            result = original(*step_args, **step_kwargs)
            self.record(model, optimizer)
            return result

        inner.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.record(model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.record(model, optimizer)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(output: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, default_data_collator

    from hf_aligned import AlignedForCausalLM, AlignedTrainer, AlignedTrainingArguments

    start_rss = peak_rss()
    torch.manual_seed(0)
    model = AlignedForCausalLM.from_config(LlamaConfig(**MODEL))
    ids = torch.randint(0, MODEL["vocab_size"], (64, SEQUENCE), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = AlignedTrainingArguments(
        output_dir=str(output.parent / "trainer"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = AlignedTrainer(model, args, train_dataset=data, data_collator=default_data_collator)
    meter = StateMeter()
    trainer.add_callback(meter)
    started = time.perf_counter()
    trainer.train()
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "state_bytes": meter.peaks,
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": peak_rss(),
        "train_seconds": time.perf_counter() - started,
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "num_parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
    }
    output.with_name(f"{output.stem}_rank{record['rank']}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------------------------------
# Driver: one launch per engine
# ----------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: str, folder: Path) -> dict:
    config = REPO / "examples" / "accelerate" / f"{engine}.yaml"
    command = ["accelerate", "launch", "--config_file", str(config.relative_to(REPO)), "--main_process_port",
               str(free_port()), "benchmarks/scale.py", "--worker", str(folder / f"{engine}.json")]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *command[2:]], cwd=REPO, env=environment, text=True,
        capture_output=True,
    )  # fmt: skip
    if completed.returncode:
        raise RuntimeError(f"{engine} failed:\n{completed.stderr[-4000:]}")
    ranks = [json.loads((folder / f"{engine}_rank{rank}.json").read_text()) for rank in (0, 1)]
    return {"command": " ".join(command), "seconds": time.perf_counter() - started, "ranks": ranks}


def run(results_path: Path) -> dict:
    folder = REPO / "outputs" / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    engines = {engine: launch(engine, folder) for engine in ENGINES}
    results = {
        "provenance": {
            "command": "python benchmarks/scale.py",
            "seeds": [0],
            "commit": describe_machine()["commit"],
            "machine": describe_machine()["cpu"],
            "software": describe_machine()["software"],
            "duration_s": round(time.perf_counter() - started, 1),
        },
        "settings": {"model": MODEL, "steps": STEPS, "batch_per_process": BATCH, "sequence": SEQUENCE},
        "engines": engines,
    }
    write_json(results_path, results)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """Per engine: the largest per-process state (MiB, by kind and total), peak resident memory (MiB), the ratio of
    the total state to DDP's, and the largest relative difference of the per-step losses from DDP's."""
    ddp = results["engines"]["ddp"]
    ddp_total = max(rank["state_bytes"]["total"] for rank in ddp["ranks"])
    ddp_losses = ddp["ranks"][0]["losses"]
    summary = {}
    for engine, run in results["engines"].items():
        ranks = run["ranks"]
        row = {kind: max(rank["state_bytes"][kind] for rank in ranks) / MIB for kind in ranks[0]["state_bytes"]}
        row["peak_rss"] = max(rank["peak_rss_bytes"] for rank in ranks) / MIB
        row["ratio"] = max(rank["state_bytes"]["total"] for rank in ranks) / ddp_total
        losses = ranks[0]["losses"]
        row["loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ddp_losses))
        summary[engine] = row
    return summary


def render_blocks(results: dict) -> dict[str, str]:
    summary = summarize(results)
    settings = results["settings"]
    parameters = results["engines"]["ddp"]["ranks"][0]["num_parameters"]
    lines = [
        f"Aligned causal LM (Llama, {settings['model']['num_hidden_layers']} blocks of width "
        f"{settings['model']['hidden_size']}, {parameters / 1e6:.1f}M parameters, fp32, AdamW), 2 CPU processes, "
        f"{settings['steps']} steps of {settings['batch_per_process']} sequences of {settings['sequence']} tokens per process. "
        "MiB per process (the larger of the two):",
        "",
        "| engine | parameters | gradients | optimizer | state total | of DDP's | reduce buffers | peak resident | "
        "loss vs DDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, row in summary.items():
        lines.append(
            f"| {engine} | {row['parameters']:.0f} | {row['gradients']:.0f} | {row['optimizer']:.0f} | "
            f"{row['total']:.0f} | {row['ratio']:.2f} | {row['buffers']:.0f} | {row['peak_rss']:.0f} | "
            f"{row['loss_difference']:.1e} |"
        )
    zero3 = summary["deepspeed_zero3"]["ratio"]
    verdict = (
        "met"
        if zero3 <= TARGET
        else (
            "missed: besides the model's own partition of the parameters, DeepSpeed keeps an fp32 master copy of it for "
            "the optimizer also when training in fp32, so a process holds 5/N model-sized copies where DDP holds 4 "
            "(parameters, gradients, two AdamW moments): 2.5 against 4 at N = 2 processes, 0.625 of DDP's; with bf16 mixed "
            "precision that copy is the usual fp32 master weights"
        )
    )
    lines += ["", f"ZeRO-3 state per process: {zero3:.2f} of DDP's (target: at most {TARGET}: {verdict})."]
    return {"scale_memory": "\n".join(lines)}


def print_summary(results: dict) -> None:
    rows = [[engine, *(round(value, 3) for value in row.values())] for engine, row in summarize(results).items()]
    headers = ["engine", *next(iter(summarize(results).values())).keys()]
    print_table("Per-process memory (MiB) and ratios", headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["run", "render"], default="run")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker is not None:
        worker(options.worker)
        return
    results = run(RESULTS) if options.phase == "run" else json.loads(RESULTS.read_text(encoding="utf-8"))
    print_summary(results)
    for path in write_blocks(render_blocks(results), DOCUMENTS):
        print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
