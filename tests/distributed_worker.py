"""Trains both tiny aligned models with `AlignedTrainer` and writes what tests/test_distributed.py compares.

Run by the tests with `python` (one process) or `accelerate launch` (two processes: DDP, DeepSpeed ZeRO-2/3), with
the same global batch, so every engine sees the same global batches:

    python tests/distributed_worker.py OUTPUT_DIR

For each model (`classifier`: a BERT-like AlignedForSequenceClassification, `causal`: an AlignedForCausalLM of a
Llama config) it writes under OUTPUT_DIR/<model>/: the saved checkpoint, `log_history.json` (per-step loss and
per-layer losses), `eval.json` (the evaluation on 9 samples, batch 4 per process: not a multiple of processes x
batch), `probe_logits.pt` (the trained model's logits on a fixed probe batch), and `rank_<r>.json` from every
process (world size and the learning rate of every optimizer parameter group).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import BertConfig, LlamaConfig, default_data_collator

from hf_aligned import (
    AlignedConfig,
    AlignedForCausalLM,
    AlignedForSequenceClassification,
    AlignedTrainer,
    AlignedTrainingArguments,
)

GLOBAL_BATCH = 8
STEPS = 3
SEQUENCE = 12
VOCAB = 64
CLASSIFIER_LR_RATIO = 10.0
PROBE = torch.arange(2 * SEQUENCE).remainder(VOCAB - 1).add(1).view(2, SEQUENCE)


def build_model(kind: str) -> torch.nn.Module:
    """The same random weights in every process (seeded), no dropout, so every engine computes the same function."""
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4}
    if kind == "classifier":
        base = BertConfig(**common, intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return AlignedForSequenceClassification(AlignedConfig(base_config=base, num_labels=3, classifier_dropout=0.0))
    base = LlamaConfig(**common, intermediate_size=37, num_key_value_heads=2, pad_token_id=0)
    return AlignedForCausalLM.from_config(base)


def dataset(kind: str, size: int, seed: int, ignored: bool = False) -> Dataset:
    """Random token ids with a class label per text, or next-token labels (`ignored`: a varying number of ignored
    positions per sample; training keeps every token, so that every process's token mean weighs alike)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, SEQUENCE), generator=generator)
    if kind == "classifier":
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})
    labels = ids.clone()
    for row in range(size if ignored else 0):
        labels[row, : row % 5] = -100  # samples count different numbers of tokens
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def run(kind: str, model: torch.nn.Module, output: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = AlignedTrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        per_device_eval_batch_size=4,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        classifier_lr_ratio=CLASSIFIER_LR_RATIO if kind == "classifier" else None,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    trainer = AlignedTrainer(
        model,
        args,
        train_dataset=dataset(kind, 64, seed=1),
        eval_dataset=dataset(kind, 9, seed=2, ignored=True),
        data_collator=default_data_collator,
    )
    trainer.train()
    metrics = trainer.evaluate()
    model = trainer.model_wrapped
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    rank = trainer.args.process_index
    groups = [group["lr"] for group in trainer.optimizer.param_groups]
    record = {"world_size": world, "group_lrs": groups, "engine": trainer.accelerator.distributed_type.value}
    bucket = getattr(trainer.model_wrapped, "zero_reduce_bucket_size", None)  # a DeepSpeed engine's reduce bucket
    record.update(reduce_bucket_size=bucket() if bucket else None, hidden_size=trainer.model.config.hidden_size)
    (output / f"rank_{rank}.json").write_text(json.dumps(record))
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        torch.save(logits.detach().cpu(), output / "probe_logits.pt")
        (output / "eval.json").write_text(json.dumps(metrics))
        (output / "log_history.json").write_text(json.dumps(trainer.state.log_history))


def force_fsdp2_on_cpu() -> None:
    """Turns the CPU processes' DDP into FSDP2 with the settings of examples/accelerate/fsdp2.yaml (accelerate runs
    FSDP on GPUs only, and falls back to DDP on CPU processes); the tests set `FORCE_FSDP2=1`."""
    import yaml
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2.yaml").read_text())
    fsdp = config["fsdp_config"]
    settings = {
        "fsdp_version": fsdp["fsdp_version"],
        "auto_wrap_policy": fsdp["fsdp_auto_wrap_policy"],
        "cpu_ram_efficient_loading": fsdp["fsdp_cpu_ram_efficient_loading"],
        "cpu_offload": fsdp["fsdp_offload_params"],
        "reshard_after_forward": fsdp["fsdp_reshard_after_forward"],
        "state_dict_type": fsdp["fsdp_state_dict_type"],
    }
    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = FullyShardedDataParallelPlugin(**settings)

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    if os.environ.get("FORCE_FSDP2") == "1":
        force_fsdp2_on_cpu()
    # Both models are built before any training arguments: under ZeRO-3, arguments turn on transformers' partitioned
    # (ZeRO-3) init for models built afterwards, whose random weights then differ from the one-process run's.
    models = {name: build_model(name) for name in ("classifier", "causal")}
    for name, built in models.items():
        run(name, built, Path(sys.argv[1]) / name)
