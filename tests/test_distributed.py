"""Training past one process, as users launch it: `accelerate launch` with DDP and DeepSpeed ZeRO-2 / ZeRO-3 on two CPU
processes (gloo), each compared with a one-process run of the same global batches (tests/distributed_worker.py).

One launch per engine trains both tiny models, evaluates them and saves them; the tests compare what it wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_aligned import AlignedForSequenceClassification

from .distributed_worker import CLASSIFIER_LR_RATIO, PROBE, dataset
from .test_examples import free_port, run_script

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "deepspeed is not installed: `pip install -e '.[deepspeed]'` (make install does)"
ENGINES = [
    "ddp",
    "fsdp2_forced",
    pytest.param("deepspeed_zero2", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)),
    pytest.param("deepspeed_zero3", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)),
]
MODELS = ("classifier", "causal")
ENGINE_TYPES = {
    "ddp": "MULTI_CPU",
    "fsdp2_forced": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The one-process run, launched once for the module; each engine is launched on first use (see `engine_run`)."""
    root = tmp_path_factory.mktemp("distributed")
    run_script([sys.executable, "tests/distributed_worker.py", str(root / "single")])
    return root


@pytest.fixture(scope="module")
def launched() -> dict[str, Path]:
    return {}


# DeepSpeed's ops are compiled into a folder of this virtual environment: in the shared ~/.cache/torch_extensions,
# virtual environments with their own DeepSpeed sources (one per checkout) rebuild each other's op at every launch.
EXTENSIONS = {"TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
BUILD_DEEPSPEED_OP = (
    "from deepspeed.accelerator import get_accelerator; "
    "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
)


@pytest.fixture(scope="session")
def deepspeed_op() -> None:
    """Compiles DeepSpeed's shared-memory op (what its CPU processes communicate with) once, before any launch: about
    a minute the first time in a virtual environment, then loaded from its cache, so the launches stay short."""
    run_script([sys.executable, "-c", BUILD_DEEPSPEED_OP], timeout=600, environment=EXTENSIONS)


@pytest.fixture
def engine_run(runs, launched, request):
    """The output folder of one engine's two-process launch (launched once per engine and module)."""

    def get(engine: str) -> Path:
        if engine not in launched:
            output = runs / engine
            if engine.startswith("deepspeed"):
                request.getfixturevalue("deepspeed_op")
            # FSDP2 does not run through accelerate on CPU processes: the worker turns the DDP launch into FSDP2 with
            # the settings of fsdp2.yaml (FORCE_FSDP2).
            config = CONFIGS / ("ddp.yaml" if engine == "fsdp2_forced" else f"{engine}.yaml")
            run_script(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                 "--main_process_port", str(free_port()), "tests/distributed_worker.py", str(output)],
                timeout=240,
                environment={**EXTENSIONS, **({"FORCE_FSDP2": "1"} if engine == "fsdp2_forced" else {})},
            )  # fmt: skip
            launched[engine] = output
        return launched[engine]

    return get


def training_logs(folder: Path) -> list[dict]:
    return [log for log in json.loads((folder / "log_history.json").read_text()) if "loss" in log]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", MODELS)
def test_per_step_and_per_layer_losses_equal_one_process(runs, engine_run, engine, kind):
    single, launched = training_logs(runs / "single" / kind), training_logs(engine_run(engine) / kind)
    assert len(single) == len(launched) == 3
    for step, (one, two) in enumerate(zip(single, launched), start=1):
        keys = ["loss", *(f"layer_{layer}_loss" for layer in (1, 2, 3))]
        assert all(key in two for key in keys), two
        for key in keys:
            assert two[key] == pytest.approx(one[key], rel=1e-4), (step, key)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", MODELS)
def test_every_rank_keeps_the_learning_rate_groups(runs, engine_run, engine, kind):
    single = json.loads((runs / "single" / kind / "rank_0.json").read_text())
    ranks = [json.loads((engine_run(engine) / kind / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert [rank["engine"] for rank in ranks] == [ENGINE_TYPES[engine]] * 2  # what was asked for, no silent fallback
    for rank in ranks:
        assert rank["group_lrs"] == single["group_lrs"]
    lrs = single["group_lrs"]
    expected_ratio = CLASSIFIER_LR_RATIO if kind == "classifier" else 1.0
    assert max(lrs) / min(lrs) == pytest.approx(expected_ratio)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
@pytest.mark.parametrize("kind", MODELS)
def test_the_zero3_config_sizes_the_reduce_bucket_from_the_model(engine_run, kind):
    # deepspeed_zero3.json leaves the bucket sizes "auto": Trainer fills hidden_size², not DeepSpeed's 5e8 elements.
    for rank in (0, 1):
        record = json.loads((engine_run("deepspeed_zero3") / kind / f"rank_{rank}.json").read_text())
        assert record["reduce_bucket_size"] == record["hidden_size"] ** 2 < 5e8


@pytest.mark.parametrize("engine", ENGINES)
def test_saved_checkpoints_reload_with_the_trained_models_logits(engine_run, engine):
    folder = engine_run(engine)
    classifier = AlignedForSequenceClassification.from_pretrained(folder / "classifier").eval()
    causal = AutoModelForCausalLM.from_pretrained(folder / "causal").eval()
    assert type(causal).__name__ == "LlamaForCausalLM"  # a plain checkpoint: no hf_aligned class needed
    with torch.no_grad():
        reloaded = {"classifier": classifier(input_ids=PROBE).logits, "causal": causal(input_ids=PROBE).logits}
    for kind, logits in reloaded.items():
        trained = torch.load(folder / kind / "probe_logits.pt")
        torch.testing.assert_close(logits, trained, rtol=0, atol=1e-6, msg=kind)


def exact_token_averages(folder: Path) -> tuple[list[float], list[float]]:
    """Every layer's next-token loss and top-1 agreement with the last layer over the 9 evaluation samples, as token
    averages computed from the saved checkpoint with the plain Llama class (the layer's hidden states, the final
    norm, the LM head)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    data = dataset("causal", 9, seed=2, ignored=True)
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        layers = [model.lm_head(model.model.norm(hidden)) for hidden in out.hidden_states[1:-1]] + [out.logits]
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    counted = targets != -100
    last_top = out.logits.argmax(dim=-1).flatten()
    losses, agreement = [], []
    for logits in layers:
        logits = logits.flatten(0, 1)
        losses.append(F.cross_entropy(logits, targets, reduction="sum").item() / counted.sum().item())
        agreement.append(((logits.argmax(dim=-1) == last_top) & counted).sum().item() / counted.sum().item())
    return losses, agreement


@pytest.mark.parametrize("engine", ENGINES)
def test_causal_evaluation_is_the_exact_token_average_when_batches_do_not_divide_the_set(engine_run, engine):
    # 9 samples, 4 per process and batch on 2 processes: the last round repeats samples to even out the batches, and
    # evaluation must drop exactly those (a per-batch row cut by a count of samples counted 12 samples instead of 9).
    folder = engine_run(engine) / "causal"
    metrics = json.loads((folder / "eval.json").read_text())
    losses, agreement = exact_token_averages(folder)
    for layer, (loss, agree) in enumerate(zip(losses, agreement), start=1):
        assert metrics[f"eval_layer_{layer}_loss"] == pytest.approx(loss, rel=1e-5), layer
        assert metrics[f"eval_layer_{layer}_agreement"] == pytest.approx(agree, abs=1e-9), layer


GUARDED_SCRIPT = """
import sys
import torch
from datasets import Dataset
from transformers import BertConfig
from hf_aligned import AlignedConfig, AlignedForSequenceClassification, AlignedTrainer, AlignedTrainingArguments

base = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)
model = AlignedForSequenceClassification(AlignedConfig(base_config=base, num_labels=2))
args = AlignedTrainingArguments(sys.argv[1], use_cpu=sys.argv[2] == "true", report_to="none", max_steps=1)
trainer = AlignedTrainer(model, args, train_dataset=Dataset.from_dict({"input_ids": [[1, 2]] * 4, "labels": [0, 1] * 2}))
print(f"trainer ready with {trainer.accelerator.num_processes} process(es)")
"""


def launch_guarded(tmp_path: Path, options: list[str], use_cpu: bool) -> subprocess.CompletedProcess:
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--main_process_port", str(free_port()),
               str(script), str(tmp_path / "out"), str(use_cpu).lower()]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(CONFIGS.parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)


def test_processes_that_would_train_unsynchronised_are_refused_with_the_fix(tmp_path):
    # An FSDP config on a machine without GPUs, script not on the CPU: accelerate joins the two processes in one
    # process group but gives each a non-distributed trainer (before the guard: both trained alone and drifted).
    completed = launch_guarded(tmp_path, ["--config_file", str(CONFIGS / "fsdp2.yaml")], use_cpu=False)
    assert completed.returncode != 0
    assert (
        "2 processes share a torch.distributed process group, but the trainer is not distributed" in completed.stderr
    )
    assert "examples/accelerate/ddp.yaml train.py --use_cpu true" in completed.stderr
    assert "trainer ready" not in completed.stdout


def test_a_multi_process_cpu_launch_that_came_up_as_one_process_warns(tmp_path):
    completed = launch_guarded(tmp_path, ["--cpu", "--num_processes", "2"], use_cpu=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trainer ready with 1 process(es)") == 1
    assert "may have been asked for several processes but started one" in completed.stderr


def test_an_fsdp_config_on_cpu_processes_warns_that_it_runs_ddp(tmp_path):
    completed = launch_guarded(tmp_path, ["--config_file", str(CONFIGS / "fsdp2.yaml")], use_cpu=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("trainer ready with 2 process(es)") == 2
    assert "The launch config asks for FSDP, but accelerate trains with MULTI_CPU" in completed.stderr
