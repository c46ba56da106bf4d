"""Every command README, docs/ and the examples' docstrings show: its arguments parse, and the ones that need no
download run (with a step or two and a few samples appended, so the test stays short)."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from hf_aligned import AlignedTrainingArguments, ExitCalibrationArguments
from hf_aligned.cli import build_parser

from .test_examples import run_script

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*.py"))]
PROGRAMS = ("python examples/", "hf-aligned ", "accelerate launch ")
# Appended to a command that runs: the fewest steps and samples that still train, evaluate and save.
QUICK = {
    "run_causal_lm.py": ["--max_steps", "1", "--max_train_samples", "4", "--max_eval_samples", "2"],
    "run_image_classification.py": ["--max_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "8"],
    "run_text_classification.py": ["--max_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "8"],
}
COMMON = ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--report_to", "none"]
COMMON += ["--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true"]


def _text_of(path: Path) -> str:
    """A markdown file's shell blocks, or a Python file's module docstring."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(text)) or ""
    return "\n".join(re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.DOTALL))


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for every command line shown, continuation lines joined (a `...` in it stands for arguments
    shown before)."""
    commands = []
    for path in SOURCES:
        lines = _text_of(path).replace("\\\n", " ").splitlines()
        for line in lines:
            command = line.strip()
            if command.startswith(PROGRAMS):
                command = command.split(" # ")[0].strip()
                commands.append((path.name, " ".join(command.split())))
    return commands


def _script_and_args(command: str) -> tuple[str, list[str]]:
    words = shlex.split(command.replace("...", ""))
    if words[0] == "accelerate":
        assert words[2] == "--config_file" and (REPO / words[3]).is_file(), command
        words = ["python", *words[4:]]
    if words[0] == "hf-aligned":
        return "hf-aligned", words[1:]
    return Path(words[1]).name, words[2:]


def _example_parser(script: str) -> HfArgumentParser:
    name = f"shown_{script.removesuffix('.py')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    module = sys.modules[name]
    return HfArgumentParser(
        (module.ModelArguments, module.DataArguments, ExitCalibrationArguments, AlignedTrainingArguments)
    )


def _needs_download(args: list[str]) -> bool:
    """Whether a command reads a Hub dataset or checkpoint (nothing downloads in the tests) or a placeholder."""
    joined = " ".join(args)
    return bool(re.search(r"--dataset_name|--model_name_or_path|path/to/|your-name/|--dataset (?!\S*\.\w+\b)", joined))


def test_the_docs_show_commands_of_every_example():
    scripts = {_script_and_args(command)[0] for _, command in shown_commands()}
    assert set(QUICK) <= scripts and "hf-aligned" in scripts


@pytest.mark.parametrize(("where", "command"), shown_commands(), ids=lambda value: str(value)[:40])
def test_every_shown_command_parses(where, command):
    script, args = _script_and_args(command)
    if script == "hf-aligned":
        build_parser().parse_args(args)
        return
    # `args.json`-style commands are a file name only.
    if len(args) == 1 and args[0].endswith(".json"):
        return
    _example_parser(script).parse_args_into_dataclasses(args)


def _runnable() -> list[tuple[str, str]]:
    """The complete commands that need no download, once each (two processes are tested in test_examples)."""
    chosen = {}
    for where, command in shown_commands():
        script, args = _script_and_args(command)
        if (
            script in QUICK
            and "..." not in command
            and not command.startswith("accelerate")
            and not _needs_download(args)
        ):
            key = (script, tuple(arg for arg in args if not arg.startswith("outputs/")))
            chosen.setdefault(key, (where, command))
    return list(chosen.values())


RUNNABLE = _runnable()


@pytest.mark.slow
@pytest.mark.parametrize(("where", "command"), RUNNABLE, ids=lambda value: str(value)[:40])
def test_shown_commands_that_need_no_download_run(where, command, tmp_path):
    script, args = _script_and_args(command)
    args = [str(tmp_path / "out") if previous == "--output_dir" else arg for previous, arg in zip(["", *args], args)]
    run_script([sys.executable, f"examples/{script}", *args, *QUICK[script], *COMMON], timeout=400)
    assert (tmp_path / "out" / "config.json").is_file()
