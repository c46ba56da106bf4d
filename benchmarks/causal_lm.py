"""Causal-LM benchmark: a small Llama trained from scratch, standard vs aligned, then self-speculative decoding.

The texts of ../shared/data (SST-2 training phrases and the AG News training split; evaluation on the SST-2 dev
sentences and the AG News test split) are tokenized with a byte-level BPE tokenizer trained on the training texts
(`tokenizers`, 2,048 entries), joined with an end-of-text token and cut into blocks of 64 tokens. The model is a
Llama of 8 blocks, width 256, MLP 688, 4 heads, tied embeddings: per token the blocks cost about 12 times the LM head,
as in real LLMs. Both variants train through `AlignedTrainer` for the same steps with the same data order and
optimization (AdamW, learning rate 1e-3, 5% warm-up, linear decay, batch 16):

- `standard`: `layer_weights="last"`, i.e. ordinary language-model training (the loss of the plain model);
- `aligned`: the paper's loss, linear λ over all 8 blocks, every block read by the model's own norm and LM head.

Every variant is trained for every seed of `--seeds` (0, 1 and 2 by default; `--workers` runs at a time, each in its
own process), which reports every block's perplexity and top-1 agreement with the last block on the evaluation
blocks, the median step time and the peak resident memory. The summary gives every block's mean ± std over the seeds
trained for both variants, and the perplexity gap, memory and step-time ratios of aligned vs standard of the same seed,
each seed's and their mean (the targets are judged on the mean). The `speed` phase runs once, on the first seed's
checkpoints: it loads both in one process and decodes greedily at batch 1 on one CPU thread: for each prompt (the
first 16 tokens of evaluation texts, 48 new tokens, no end-of-text stop), plain greedy `generate` and
`generate(assistant_early_exit=k)` for every k, with transformers' default draft settings and with the helper's
(`num_assistant_tokens` from `suggest_assistant_early_exit` on the model's evaluation agreement, no confidence stop),
timed alternately, the fastest of `--repeats` runs of each prompt; it checks that every output is token-for-token the
plain greedy one and measures the draft acceptance on the model's own greedy continuations (the share of generated
tokens that block k's top-1 predicts). Results go to benchmarks/results/causal_lm.json after every run; a rerun skips
what is there (results of the earlier one-seed layout, runs keyed by variant, are moved to `variant/seed` keys).

    python benchmarks/causal_lm.py --workers 2      # train both variants x 3 seeds, measure speed, render README / docs
    python benchmarks/causal_lm.py --steps 60 --seeds 0 --results /tmp/causal.json --no-render   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUTS, REPO, load_ag_news, load_sst2, write_json
from recipes import isolated, load_results, provenance, replace_blocks

RESULTS = REPO / "benchmarks" / "results" / "causal_lm.json"
RENDERED_DOCUMENTS = ("README.md", "docs/causal_lm.md")
VARIANTS = {"standard": "last", "aligned": "linear"}
MODEL = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
BLOCK_SIZE = 64
PROMPT_TOKENS = 16
NEW_TOKENS = 48
TARGETS = {"speedup": 1.5, "perplexity_gap": 0.03, "memory_ratio": 1.3}


def corpus(split: str) -> list[str]:
    """SST-2 and AG News texts: the training texts, or the held-out ones (`"eval"`)."""
    if split == "train":
        return list(load_sst2("train")["text"]) + list(load_ag_news()["train"]["text"])
    return list(load_sst2("dev")["text"]) + list(load_ag_news()["test"]["text"])


def tokenizer_for(outputs: Path):
    """The BPE tokenizer trained on the training texts (trained once, then loaded from `outputs`)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    path = outputs / "tokenizer"
    if not (path / "tokenizer.json").exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus("train"), vocab_size=MODEL["vocab_size"], special_tokens=["<|endoftext|>"])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tokenizer.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def packed_blocks(texts: list[str], tokenizer, limit: int | None = None):
    """The texts joined with end-of-text tokens and cut into `BLOCK_SIZE`-token blocks (a `datasets.Dataset`)."""
    from datasets import Dataset

    ids = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids += [*encoded, tokenizer.eos_token_id]
    blocks = [ids[start : start + BLOCK_SIZE] for start in range(0, len(ids) - BLOCK_SIZE + 1, BLOCK_SIZE)]
    return Dataset.from_dict({"input_ids": blocks[:limit] if limit else blocks})


def train_one(variant: str, seed: int, steps: int, outputs: str) -> dict:
    """Trains one variant from scratch in this (fresh) process and evaluates every block."""
    import torch
    from transformers import DataCollatorForLanguageModeling, LlamaConfig, TrainerCallback

    from hf_aligned import AlignedForCausalLM, AlignedTrainer, AlignedTrainingArguments

    torch.set_num_threads(1)
    outputs = Path(outputs)
    tokenizer = tokenizer_for(outputs)
    train, evaluation = packed_blocks(corpus("train"), tokenizer), packed_blocks(corpus("eval"), tokenizer, 300)
    config = LlamaConfig(**MODEL, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    torch.manual_seed(seed)
    model = AlignedForCausalLM.from_config(config, layer_weights=VARIANTS[variant])
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = AlignedTrainingArguments(
        output_dir=str(outputs / f"{variant}-{seed}"),
        max_steps=steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        warmup_steps=0.05,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = AlignedTrainer(
        model, args, train_dataset=train, eval_dataset=evaluation, data_collator=collator, callbacks=[StepTimer()]
    )
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    metrics = trainer.evaluate()
    trainer.save_model()
    tokenizer.save_pretrained(args.output_dir)
    layers = range(1, MODEL["num_hidden_layers"] + 1)
    return {
        "layer_perplexity": [metrics[f"eval_layer_{layer}_perplexity"] for layer in layers],
        "layer_agreement": [metrics[f"eval_layer_{layer}_agreement"] for layer in layers],
        "minimal_depth": metrics["eval_minimal_depth"],
        "eval_tokens": len(evaluation) * (BLOCK_SIZE - 1),
        "train_tokens": steps * 16 * BLOCK_SIZE,
        "median_step_time_s": statistics.median(times[5:] or times),
        "peak_rss_bytes": peak,
        "rss_before_training_bytes": rss_start,
        "wall_time_s": round(wall, 1),
    }


def measure_speed(outputs: str, seed: int, prompts: int, repeats: int, draft_tokens: dict[str, int]) -> dict:
    """Plain vs self-speculative greedy decoding of both checkpoints, alternating, best of `repeats`: every k with
    transformers' default draft settings, and with the helper's (`draft_tokens[variant]` tokens, no confidence stop)."""
    import torch

    from hf_aligned import AlignedForCausalLM

    torch.set_num_threads(1)
    tokenizer = tokenizer_for(Path(outputs))
    texts = [text for text in corpus("eval") if len(tokenizer(text)["input_ids"]) >= PROMPT_TOKENS][::37][:prompts]
    inputs = [torch.tensor([tokenizer(text)["input_ids"][:PROMPT_TOKENS]]) for text in texts]
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    models = {v: AlignedForCausalLM.from_pretrained(Path(outputs) / f"{v}-{seed}").eval() for v in VARIANTS}
    depth = MODEL["num_hidden_layers"]
    drafts = {"default": lambda variant: {}}
    drafts["helper"] = lambda variant: {
        "num_assistant_tokens": draft_tokens[variant],
        "assistant_confidence_threshold": 0.0,
    }
    per_model = [(None, "default")] + [(k, name) for k in range(1, depth) for name in drafts]
    runs = [(variant, k, name) for variant in VARIANTS for k, name in per_model]
    # The fastest of `repeats` runs of every (setting, prompt), summed over prompts: a burst of load on the shared
    # machine then spoils one prompt's run of one setting, not a whole setting.
    fastest = {(run, index): math.inf for run in runs for index in range(len(inputs))}
    identical = dict.fromkeys(runs, True)
    with torch.inference_mode():
        reference = {variant: [models[variant].generate(ids, **settings) for ids in inputs] for variant in VARIANTS}
        for _ in range(repeats):
            for run in runs:
                variant, k, name = run
                extra = drafts[name](variant) if k else {}
                for index, ids in enumerate(inputs):
                    start = time.perf_counter()
                    result = models[variant].generate(ids, assistant_early_exit=k, **settings, **extra)
                    fastest[run, index] = min(fastest[run, index], time.perf_counter() - start)
                    identical[run] &= torch.equal(result, reference[variant][index])
        acceptance = {variant: own_acceptance(models[variant], reference[variant]) for variant in VARIANTS}
    best = {run: sum(fastest[run, index] for index in range(len(inputs))) for run in runs}
    record = {}
    for variant in VARIANTS:
        plain = best[variant, None, "default"]
        record[variant] = {
            "plain_tokens_per_s": len(inputs) * NEW_TOKENS / plain,
            "speedup": [plain / best[variant, k, "default"] for k in range(1, depth)],
            "speedup_helper_drafts": [plain / best[variant, k, "helper"] for k in range(1, depth)],
            "identical": [
                identical[variant, k, "default"] and identical[variant, k, "helper"] for k in range(1, depth)
            ],
            "acceptance": acceptance[variant],
            "draft_tokens": draft_tokens[variant],
        }
    return {**record, "prompts": len(inputs), "repeats": repeats}


def own_acceptance(model, sequences) -> list[float]:
    """Per block k < L: the share of the model's own greedy tokens that block k's top-1 predicts."""
    import torch

    sums = torch.zeros(model.num_layers)
    for sequence in sequences:
        labels = sequence.clone()
        labels[:, :PROMPT_TOKENS] = -100  # score only the generated tokens
        sums += model(input_ids=sequence, labels=labels, output_layer_agreement=True).layer_agreement
    return (sums / len(sequences))[:-1].tolist()


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_seeds(runs: dict) -> list[int]:
    """The seeds trained for every variant, in order."""
    seeds = {record["seed"] for record in runs.values()}
    return sorted(seed for seed in seeds if all(f"{variant}/{seed}" in runs for variant in VARIANTS))


def summarize(results: dict) -> dict:
    """The headline numbers and the targets: per-layer mean ± std over the seeds trained for both variants, the
    perplexity gap, memory and step-time ratios per seed (aligned vs standard of the same seed) and their means, and
    the speed record's best setting (the `speed` seed's models)."""
    runs = results["runs"]
    seeds = paired_seeds(runs)
    if not seeds:
        raise ValueError("results['runs'] holds no seed trained for both variants: run the training phase first")
    layers = {
        variant: {
            name: [mean_std(list(values)) for values in zip(*(runs[f"{variant}/{seed}"][name] for seed in seeds))]
            for name in ("layer_perplexity", "layer_agreement")
        }
        for variant in VARIANTS
    }
    pairs = [(runs[f"standard/{seed}"], runs[f"aligned/{seed}"]) for seed in seeds]
    per_seed = {
        "perplexity_gap": [a["layer_perplexity"][-1] / s["layer_perplexity"][-1] - 1 for s, a in pairs],
        "memory_ratio": [a["peak_rss_bytes"] / s["peak_rss_bytes"] for s, a in pairs],
        "training_memory_ratio": [
            (a["peak_rss_bytes"] - a["rss_before_training_bytes"])
            / (s["peak_rss_bytes"] - s["rss_before_training_bytes"])
            for s, a in pairs
        ],
        "step_time_ratio": [a["median_step_time_s"] / s["median_step_time_s"] for s, a in pairs],
    }
    summary = {"seeds": seeds, "layers": layers, "per_seed": per_seed}
    summary.update({name: statistics.fmean(values) for name, values in per_seed.items()})
    from hf_aligned import suggest_assistant_early_exit

    speed = results.get("speed")
    speed_seed = speed.get("seed", seeds[0]) if speed else seeds[0]
    estimate = suggest_assistant_early_exit(runs[f"aligned/{speed_seed}"]["layer_agreement"])
    summary.update(  # no estimate: the cost model expects no draft depth to beat plain decoding
        speed_seed=speed_seed,
        helper_k=estimate.assistant_early_exit if estimate else None,
        helper_expected_speedup=estimate.expected_speedup if estimate else None,
    )
    if speed:
        k, drafts, speedup = best_speedup(speed["aligned"])
        summary.update(
            best_k=k,
            best_drafts=drafts,
            speedup=speedup,
            standard_speedup_same_setting=speed["standard"][DRAFT_KEYS[drafts]][k - 1],
            standard_best_speedup=best_speedup(speed["standard"])[2],
            all_identical=all(all(speed[variant]["identical"]) for variant in VARIANTS),
        )
    return summary


DRAFT_KEYS = {"default": "speedup", "helper": "speedup_helper_drafts"}


def best_speedup(record: dict) -> tuple[int, str, float]:
    """The fastest (k, draft settings, speed-up) of one model's speed record."""
    options = [
        (k, name, record[key][k - 1]) for name, key in DRAFT_KEYS.items() for k in range(1, len(record[key]) + 1)
    ]
    return max(options, key=lambda option: option[2])


def targets(summary: dict) -> dict:
    """Each target, judged on the mean over seeds (speed: on the `speed` seed's models)."""
    checks = {
        f"aligned last-layer perplexity within {TARGETS['perplexity_gap']:.0%} of standard": (
            summary["perplexity_gap"],
            summary["perplexity_gap"] <= TARGETS["perplexity_gap"],
        ),
        f"peak training memory <= {TARGETS['memory_ratio']}x standard": (
            summary["memory_ratio"],
            summary["memory_ratio"] <= TARGETS["memory_ratio"],
        ),
    }
    if "speedup" in summary:
        checks[f"self-speculative greedy >= {TARGETS['speedup']}x tokens/s, identical output"] = (
            summary["speedup"],
            summary["speedup"] >= TARGETS["speedup"] and summary["all_identical"],
        )
    return {name: {"value": value, "met": met} for name, (value, met) in checks.items()}


def seeds_text(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(str(seed) for seed in seeds)


def layers_table(results: dict) -> str:
    summary = results["summary"]
    lines = [
        f"Mean ± std over {seeds_text(summary['seeds'])}:",
        "",
        "| Layer | standard: perplexity | standard: agreement | aligned: perplexity | aligned: agreement |",
        "|---|---|---|---|---|",
    ]
    layers = summary["layers"]
    for layer in range(len(layers["standard"]["layer_perplexity"])):
        cells = [
            "{0:{2}} ± {1:{2}}".format(*layers[variant][name][layer], ".1f" if name == "layer_perplexity" else ".3f")
            for variant in VARIANTS
            for name in ("layer_perplexity", "layer_agreement")
        ]
        lines.append(f"| {layer + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(results: dict) -> str:
    speed, seed = results["speed"], results["summary"]["speed_seed"]
    lines = [
        f"Measured on the seed-{seed} models only (both variants loaded in one process, timed alternately; each "
        f"speed-up is a ratio of two timings of that process), {speed['prompts']} prompts, the fastest of "
        f"{speed['repeats']} runs of each:",
        "",
        "| `assistant_early_exit` | standard: acceptance | standard: tokens/s vs greedy, default drafts / helper's "
        "| aligned: acceptance | aligned: tokens/s vs greedy, default drafts / helper's | identical output |",
        "|---|---|---|---|---|---|",
    ]
    for index in range(len(speed["aligned"]["speedup"])):
        cells = [
            f"{speed[v]['acceptance'][index]:.3f} | {speed[v]['speedup'][index]:.2f}x / "
            f"{speed[v]['speedup_helper_drafts'][index]:.2f}x"
            for v in VARIANTS
        ]
        same = all(speed[variant]["identical"][index] for variant in VARIANTS)
        lines.append(f"| {index + 1} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def per_seed_text(values: list[float], form: str, suffix: str = "") -> str:
    return ", ".join(format(value, form) + suffix for value in values)


def targets_table(results: dict) -> str:
    summary, checks = results["summary"], results["targets"]
    per_seed, seed = summary["per_seed"], summary["speed_seed"]
    lines = [
        f"Training: the mean over {seeds_text(summary['seeds'])} of aligned vs standard of the same seed (each seed "
        f"in brackets); decoding: the seed-{seed} models.",
        "",
        "| Target | Measured | Met |",
        "|---|---|---|",
    ]
    shown = {
        "perplexity": f"{summary['perplexity_gap']:+.1%} ({per_seed_text(per_seed['perplexity_gap'], '+.1%')})",
        "memory": f"{summary['memory_ratio']:.2f}x ({per_seed_text(per_seed['memory_ratio'], '.2f', 'x')})",
    }
    for name, check in checks.items():
        value = next((text for key, text in shown.items() if key in name), f"{check['value']:.2f}x")
        lines.append(f"| {name} | {value} | {'yes' if check['met'] else 'no'} |")
    for name, label in (
        ("training_memory_ratio", "memory added by training, above the loaded process"),
        ("step_time_ratio", "median step time vs standard"),
    ):
        lines.append(f"| ({label}) | {summary[name]:.2f}x ({per_seed_text(per_seed[name], '.2f', 'x')}) | - |")
    helper = f"{summary['helper_expected_speedup']:.2f}x" if summary["helper_k"] is not None else "no draft suggested"
    lines.append(
        f"| (`suggest_assistant_early_exit` on the seed-{seed} aligned model's evaluation agreement: "
        f"k = {summary['helper_k']}, cost-model estimate) | {helper} | - |"
    )
    if "best_k" in summary:
        lines.append(
            f"| (standard model, self-speculative vs its own greedy, at the aligned model's best setting: k = "
            f"{summary['best_k']}, {summary['best_drafts']} draft settings) | "
            f"{summary['standard_speedup_same_setting']:.2f}x (at its own best: {summary['standard_best_speedup']:.2f}x)"
            " | - |"
        )
    return "\n".join(lines)


def render_blocks(results: dict) -> dict[str, str]:
    """Every rendered block, by name."""
    blocks = {"causal-lm-targets": targets_table(results), "causal-lm-layers": layers_table(results)}
    if "speed" in results:
        blocks["causal-lm-speed"] = speed_table(results)
    return blocks


def migrate(results: dict) -> dict:
    """Results of the one-seed layout (runs keyed by variant, `setup["seed"]`) moved to runs keyed `variant/seed`,
    numbers and provenance unchanged."""
    seed = results.get("setup", {}).pop("seed", None)
    for variant in VARIANTS:
        if variant in results["runs"]:
            record = results["runs"].pop(variant)
            results["runs"][f"{variant}/{seed}"] = {**record, "variant": variant, "seed": seed}
    if "speed" in results and seed is not None:
        results["speed"].setdefault("seed", seed)
    return results


def train_phase(options: argparse.Namespace, results: dict) -> None:
    """Trains every missing (variant, seed), `--workers` at a time, each in a fresh process; the JSON is written
    after every run, so an interrupted benchmark resumes where it stopped."""
    pending = [(v, seed) for seed in options.seeds for v in VARIANTS if f"{v}/{seed}" not in results["runs"]]
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(train_one, variant, seed, options.steps, str(options.outputs)): (variant, seed)
            for variant, seed in pending
        }
        for future in as_completed(futures):
            variant, seed = futures[future]
            record = {**future.result(), "variant": variant, "seed": seed, "workers": options.workers}
            results["runs"][f"{variant}/{seed}"] = {**record, "provenance": provenance(sys.argv)}
            write_json(options.results, results)
            print(f"=== {variant}/{seed}: perplexity {record['layer_perplexity'][-1]:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps of both variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the speed phase uses the first")
    parser.add_argument("--workers", type=int, default=1, help="training runs at a time (each one process)")
    parser.add_argument("--prompts", type=int, default=6, help="prompts decoded in the speed phase")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best of, per prompt)")
    parser.add_argument("--outputs", type=Path, default=OUTPUTS / "causal_lm", help="tokenizer and checkpoints")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-render", action="store_true", help="leave README and docs alone")
    options = parser.parse_args()
    results = migrate(load_results(options.results))
    results.setdefault("setup", {"model": MODEL, "block_size": BLOCK_SIZE, "steps": options.steps})
    results["setup"]["seeds"] = sorted({*results["setup"].get("seeds", []), *options.seeds})
    tokenizer_for(options.outputs)  # trained once, before the runs that share it start
    train_phase(options, results)
    if "speed" not in results:
        print("=== speed", flush=True)
        from transformers import GenerationConfig

        from hf_aligned import suggest_assistant_early_exit

        seed = options.seeds[0]
        estimates = {
            variant: suggest_assistant_early_exit(results["runs"][f"{variant}/{seed}"]["layer_agreement"])
            for variant in VARIANTS
        }
        # Without an estimate (no draft expected to pay off), the helper's settings are transformers' default length.
        draft_tokens = {
            variant: estimate.num_assistant_tokens if estimate else GenerationConfig().num_assistant_tokens
            for variant, estimate in estimates.items()
        }
        speed = isolated(measure_speed, str(options.outputs), seed, options.prompts, options.repeats, draft_tokens)
        results["speed"] = {**speed, "seed": seed, "provenance": provenance(sys.argv)}
    results["summary"] = summarize(results)
    results["targets"] = targets(results["summary"])
    write_json(options.results, results)
    for name, block in render_blocks(results).items():
        print(f"\n{name}\n\n{block}\n")
    if not options.no_render:
        blocks = render_blocks(results)
        for name in RENDERED_DOCUMENTS:
            path = REPO / name
            text = path.read_text(encoding="utf-8")
            if replace_blocks(text, blocks) != text:
                path.write_text(replace_blocks(text, blocks), encoding="utf-8")
                print(f"rendered {name}")


if __name__ == "__main__":
    main()
