"""Scale benchmark: memory per process of an aligned causal LM trained on 2 CPU processes with DDP, DeepSpeed ZeRO-2
and ZeRO-3 (the configs of examples/accelerate/), through `accelerate launch` and `AlignedTrainer`, in fp32 and with
bf16 mixed precision.

The model is large enough that the training state dominates: a Llama-style AlignedForCausalLM with 8 blocks of width
512 (intermediate 1376, 8 heads, vocabulary 2048: 27.4M parameters), AdamW, 4 steps of 2 sequences of 64 tokens per
process. Each engine runs twice, with its config unchanged: in fp32, and with the training argument `bf16=True` (the
scripts' `--bf16 true`), which is autocast over fp32 parameters under DDP and DeepSpeed's `bf16` mode (bf16
parameters and gradients, fp32 master weights and AdamW moments) under ZeRO. Every process measures, before and after
each optimizer step (also from inside accelerate's and DeepSpeed's `step`, where DeepSpeed's gradient partitions are
alive) and apart from that inside the step (around the torch AdamW that DeepSpeed wraps, where DeepSpeed also holds
a flat copy of its gradient partition), the bytes of the tensors it holds:

- parameters: the model's parameters (under ZeRO-3 the local partition `ds_tensor`, the parameters themselves are
  empty between uses);
- gradients: the parameters' `.grad` and the gradient buffers the DeepSpeed optimizer keeps (attributes named `grad`);
- optimizer: every other tensor the optimizer object reaches (AdamW's moments; DeepSpeed's flat fp32 partitions);
- apart from the state: the communication buffers DeepSpeed allocates up front (its reduce buckets, attributes named
  `bucket`: DeepSpeed's default holds 5e8 elements, mostly never touched, so it barely shows in resident memory;
  deepspeed_zero3.json now sizes it from the hidden size, and the committed results predate that);

each storage counted once, the maximum over the steps kept (temporaries a step allocates and frees are not
counted: torch's AdamW on CPU makes them one tensor at a time, a layer's size under DDP, the whole flat
partition's under ZeRO), and the peak resident memory of the process (`ru_maxrss`,
which includes the ~0.7 GB of the imported libraries). Results go to benchmarks/results/scale.json; `--phase render`
writes the table into docs/distributed.md and docs/results.md (`benchmarks/reproduce.py` renders the latter whole).

    nice -n 5 python benchmarks/scale.py                 # the six launches (about 4 minutes), then render
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
PRECISIONS = ("fp32", "bf16")
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
    """Keeps the largest `state_bytes` (and their sum, `total`) seen around every optimizer step: `peaks` before and
    after it, `in_step` also inside it, around the torch optimizer that DeepSpeed's wraps (where DeepSpeed holds a
    flat copy of its gradient partition, in the master weights' fp32)."""

    def __init__(self):
        self.peaks = {"parameters": 0, "gradients": 0, "optimizer": 0, "buffers": 0, "total": 0}
        self.in_step = dict(self.peaks)

    def record(self, model, optimizer, inside: bool = False) -> None:
        sizes = state_bytes(model, optimizer)
        sizes["total"] = sizes["parameters"] + sizes["gradients"] + sizes["optimizer"]
        for peaks in (self.in_step,) if inside else (self.peaks, self.in_step):
            for key, value in sizes.items():
                peaks[key] = max(peaks[key], value)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # accelerate runs DeepSpeed's step inside `backward`, where ZeRO-2's gradient partition lives: the step of
        # every optimizer in the chain (accelerate's wrapper, DeepSpeed's, the torch AdamW inside) is measured before
        # and after, the innermost one's as inside the step.
        inner = getattr(optimizer, "optimizer", None)
        while inner is not None:
            innermost = getattr(inner, "optimizer", None) is None
            self.wrap(inner, model, optimizer, inside=innermost)
            inner = getattr(inner, "optimizer", None)

    def wrap(self, inner, model, optimizer, inside: bool) -> None:
        original = inner.step

        def step(*step_args, **step_kwargs):
            self.record(model, optimizer, inside)
            result = original(*step_args, **step_kwargs)
            self.record(model, optimizer, inside)
            return result

        inner.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.record(model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.record(model, optimizer)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(output: Path, bf16: bool) -> None:
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
        bf16=bf16,
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
        "state_bytes_in_step": meter.in_step,
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": peak_rss(),
        "train_seconds": time.perf_counter() - started,
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "num_parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "parameter_dtype": str(next(getattr(p, "ds_tensor", p) for p in model.parameters()).dtype),
    }
    output.with_name(f"{output.stem}_rank{record['rank']}.json").write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------------------------------
# Driver: one launch per engine
# ----------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine: str, precision: str, folder: Path) -> dict:
    """One 2-process launch of `engine`'s config, unchanged; bf16 is turned on by the training argument `bf16=True`
    (the script's `--bf16`), from which DDP autocasts and transformers writes DeepSpeed's `bf16` section."""
    config = REPO / "examples" / "accelerate" / f"{engine}.yaml"
    name = f"{engine}_{precision}"
    command = ["accelerate", "launch", "--config_file", str(config.relative_to(REPO)), "--main_process_port",
               str(free_port()), "benchmarks/scale.py", "--worker", str(folder / f"{name}.json")]  # fmt: skip
    command += ["--bf16"] if precision == "bf16" else []
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *command[2:]], cwd=REPO, env=environment, text=True,
        capture_output=True,
    )  # fmt: skip
    if completed.returncode:
        raise RuntimeError(f"{name} failed:\n{completed.stderr[-4000:]}")
    ranks = [json.loads((folder / f"{name}_rank{rank}.json").read_text()) for rank in (0, 1)]
    command[command.index("--worker") + 1] = f"outputs/scale/{name}.json"
    return {"command": " ".join(command), "seconds": time.perf_counter() - started, "ranks": ranks}


def run(results_path: Path) -> dict:
    folder = REPO / "outputs" / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = {precision: {engine: launch(engine, precision, folder) for engine in ENGINES} for precision in PRECISIONS}
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
        "precisions": runs,
    }
    write_json(results_path, results)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def summarize(results: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per precision and engine: the largest per-process state before and after the optimizer steps (MiB, by kind and
    total), that total in bytes per model parameter and as a ratio to DDP's in the same precision, the same total
    also inside the steps (MiB, and its ratio to DDP's), peak resident memory (MiB), and the largest relative
    difference of the per-step losses from that DDP run's."""
    summary = {}
    for precision, engines in results["precisions"].items():
        ddp = engines["ddp"]["ranks"]
        ddp_total = max(rank["state_bytes"]["total"] for rank in ddp)
        summary[precision] = {}
        for engine, run in engines.items():
            ranks = run["ranks"]
            row = {kind: max(rank["state_bytes"][kind] for rank in ranks) / MIB for kind in ranks[0]["state_bytes"]}
            total = max(rank["state_bytes"]["total"] for rank in ranks)
            row["bytes_per_parameter"] = total / ranks[0]["num_parameters"]
            row["peak_rss"] = max(rank["peak_rss_bytes"] for rank in ranks) / MIB
            row["ratio"] = total / ddp_total
            in_step = max(rank["state_bytes_in_step"]["total"] for rank in ranks)
            row["in_step"] = in_step / MIB
            row["in_step_ratio"] = in_step / max(rank["state_bytes_in_step"]["total"] for rank in ddp)
            pairs = zip(ranks[0]["losses"], ddp[0]["losses"], strict=True)
            row["loss_difference"] = max(abs(a - b) / abs(b) for a, b in pairs)
            summary[precision][engine] = row
    return summary


def loss_difference(results: dict, precision: str, reference: str) -> float:
    """Largest relative difference of DDP's per-step losses in `precision` from DDP's in `reference`."""
    runs = [results["precisions"][name]["ddp"]["ranks"][0]["losses"] for name in (precision, reference)]
    return max(abs(a - b) / abs(b) for a, b in zip(*runs, strict=True))


CAUSES = {
    "fp32": "DDP holds 4 fp32 model-sized copies (parameters, gradients, two AdamW moments: 16 bytes per parameter); "
    "ZeRO-3 holds its 1/N share of each and, also when training in fp32, an fp32 master copy of its parameter share "
    "for the optimizer: 20/N bytes per parameter between steps (10 at N = 2 processes, 0.625 of DDP's), and inside "
    "the step a flat copy of its gradient share (4/N more). The master copy keeps fp32 ZeRO-3 above 0.6 on 2 processes",
    "bf16": "DDP with bf16 autocast still holds fp32 parameters, gradients and AdamW moments (16 bytes per parameter; "
    "autocast's bf16 copies of the weights live only inside the forward); ZeRO-3 holds its 1/N share of the bf16 "
    "parameters and gradients and of the fp32 master weights and moments: 16/N bytes per parameter between steps (8 "
    "at N = 2, half of DDP's), and inside the step an fp32 copy of its gradient share (4/N more: 10 at N = 2, 0.625 "
    "of DDP's)",
}


def render_blocks(results: dict) -> dict[str, str]:
    summary = summarize(results)
    settings = results["settings"]
    parameters = results["precisions"]["fp32"]["ddp"]["ranks"][0]["num_parameters"]
    lines = [
        f"Aligned causal LM (Llama, {settings['model']['num_hidden_layers']} blocks of width "
        f"{settings['model']['hidden_size']}, {parameters / 1e6:.1f}M parameters, AdamW), 2 CPU processes, "
        f"{settings['steps']} steps of {settings['batch_per_process']} sequences of {settings['sequence']} tokens per "
        "process, in fp32 and with bf16 mixed precision (training argument `bf16=True`: autocast under DDP, DeepSpeed's "
        "`bf16` mode under ZeRO). MiB per process (the larger of the two); losses against DDP's in the same precision:",
        "",
        "| precision | engine | parameters | gradients | optimizer | state total | bytes per parameter | of DDP's | "
        "inside the step | of DDP's | reduce buffers | peak resident | loss vs DDP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, engines in summary.items():
        for engine, row in engines.items():
            lines.append(
                f"| {precision} | {engine} | {row['parameters']:.0f} | {row['gradients']:.0f} | {row['optimizer']:.0f} | "
                f"{row['total']:.0f} | {row['bytes_per_parameter']:.1f} | {row['ratio']:.2f} | {row['in_step']:.0f} | "
                f"{row['in_step_ratio']:.2f} | {row['buffers']:.0f} | "
                f"{row['peak_rss']:.0f} | {row['loss_difference']:.1e} |"
            )
    lines.append("")
    for precision, engines in summary.items():
        zero3 = engines["deepspeed_zero3"]
        verdicts = [("between steps", zero3["ratio"]), ("inside the step", zero3["in_step_ratio"])]
        measured = ", ".join(f"{ratio:.2f} of DDP's {where}" for where, ratio in verdicts)
        met = "; ".join(f"{'met' if ratio <= TARGET else 'missed'} {where}" for where, ratio in verdicts)
        lines.append(f"- {precision}: ZeRO-3 state per process {measured} (target: at most {TARGET}: {met}). "
                     f"{CAUSES[precision]}.")  # fmt: skip
    bf16 = loss_difference(results, "bf16", "fp32")
    lines += ["", f"DDP's per-step losses in bf16 differ from its fp32 losses by at most {bf16:.1e} (relative)."]
    return {"scale_memory": "\n".join(lines)}


def print_summary(results: dict) -> None:
    for precision, engines in summarize(results).items():
        rows = [[engine, *(round(value, 3) for value in row.values())] for engine, row in engines.items()]
        headers = ["engine", *next(iter(engines.values())).keys()]
        print_table(f"Per-process memory (MiB) and ratios, {precision}", headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["run", "render"], default="run")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker is not None:
        worker(options.worker, options.bf16)
        return
    results = run(RESULTS) if options.phase == "run" else json.loads(RESULTS.read_text(encoding="utf-8"))
    print_summary(results)
    for path in write_blocks(render_blocks(results), DOCUMENTS):
        print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
