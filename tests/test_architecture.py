"""Imports flow one way: every module of the package imports only from its own layer or the layers above it in the
table of docs/architecture.md (lazy imports inside functions included), and every module is in that table."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_aligned"
# A table row: `| 1. foundations | `compat`, `layouts` | ... |`.
LAYER_ROW = re.compile(r"^\| (\d+)\. [^|]+\| ([^|]+)\|", flags=re.MULTILINE)


def documented_layers() -> dict[str, int]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers = {}
    for number, modules in LAYER_ROW.findall(text):
        for module in re.findall(r"`(\w+)`", modules):
            assert module not in layers, f"{module} is listed twice in docs/architecture.md"
            layers[module] = int(number)
    return layers


def package_imports(path: Path) -> set[str]:
    """The package modules a file imports (`from .x import`, `from hf_aligned.x import`, `import hf_aligned.x`)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                imported.add(node.module.split(".")[0])
            elif node.level == 0 and (node.module or "").startswith("hf_aligned."):
                imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("hf_aligned.")}
    return imported


def test_the_table_parses():
    layers = documented_layers()
    assert layers["compat"] == 1 and layers["modeling_aligned"] < layers["trainer"] < layers["hub"] < layers["cli"]


def test_every_module_is_placed_in_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    unplaced = sorted(modules - set(documented_layers()))
    assert not unplaced, f"add {unplaced} to the module table of docs/architecture.md"
    gone = sorted(set(documented_layers()) - modules)
    assert not gone, f"docs/architecture.md lists modules that do not exist: {gone}"


def test_imports_flow_from_higher_layers_to_lower_ones():
    layers = documented_layers()
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        assert path.stem in layers, f"{path.stem} is not in the module table of docs/architecture.md"
        for module in sorted(package_imports(path) - {""}):
            if module in layers and layers[module] > layers[path.stem]:
                upward.append(f"{path.stem} (layer {layers[path.stem]}) imports {module} (layer {layers[module]})")
    assert not upward, "imports against the layering of docs/architecture.md:\n" + "\n".join(upward)


def test_the_model_does_not_import_the_hub_code():
    assert not package_imports(PACKAGE / "modeling_aligned.py") & {"hub", "model_card", "cli", "trainer"}


# Model modules hold model code: no Hub, card, trainer or command-line code.
MODEL_MODULES = (
    "heads",
    "losses",
    "outputs",
    "speculative",
    "sharing",
    "modeling_aligned",
    "modeling_causal_lm",
    "asr",
)


def test_no_model_module_imports_hub_card_trainer_or_cli_code():
    for module in MODEL_MODULES:
        imported = package_imports(PACKAGE / f"{module}.py")
        assert not imported & {"hub", "model_card", "card_data", "cli", "trainer", "kinds"}, module


def transformers_private_names() -> set[str]:
    """Private (single-underscore) attributes of transformers' public classes and of a default config."""
    from transformers import (
        GenerationConfig,
        PreTrainedConfig,
        PreTrainedModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.generation import GenerationMixin
    from transformers.utils import PushToHubMixin

    objects = (
        PreTrainedModel,
        PreTrainedConfig,
        PreTrainedConfig(),
        Trainer,
        TrainingArguments,
        GenerationConfig,
        TrainerCallback,
        GenerationMixin,
        PushToHubMixin,
    )
    return {name for item in objects for name in dir(item) if name.startswith("_") and not name.startswith("__")}


def private_transformers_uses(path: Path, private: set[str]) -> list[str]:
    """Private transformers names a module uses: imported from transformers, read as attributes, or overridden as
    methods."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
            parts = node.module.split(".")
            uses += [
                f"{node.module}.{alias.name}"
                for alias in node.names
                if alias.name.startswith("_") or any(part.startswith("_") for part in parts)
            ]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            uses.append(node.attr)
        elif isinstance(node, ast.ClassDef):
            uses += [item.name for item in node.body if isinstance(item, ast.FunctionDef) and item.name in private]
    return uses


def test_private_transformers_names_are_used_in_compat_only():
    private = transformers_private_names()
    assert {"_from_config", "_save", "_name_or_path", "_upload_modified_files"} <= private  # the scan sees them
    assert private_transformers_uses(PACKAGE / "compat.py", private)  # and finds compat's own uses
    found = {
        path.stem: uses
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "compat" and (uses := private_transformers_uses(path, private))
    }
    assert not found, f"move these uses of transformers internals into compat.py: {found}"


def test_no_tracked_symlinks_and_card_templates_live_once_in_the_package():
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        return
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t")[-1] for line in listed.splitlines() if line.startswith("120000")]
    assert not links, f"tracked symlinks break Windows checkouts and some packaging tools: {links}"
    assert not list((REPO / "model_cards").glob("*model_card.md"))  # the top-level folder points, holds no copy
    assert {path.name for path in (PACKAGE / "model_cards").glob("*.md")} == {
        "aligned_model_card.md",
        "causal_lm_model_card.md",
    }


def test_the_map_says_where_a_change_to_the_loss_early_exit_and_the_card_goes():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (the loss|early exit|the Hub card) [^|]*\| `(\w+)\.py`", text, flags=re.MULTILINE))
    assert rows == {"the loss": "losses", "early exit": "early_exit", "the Hub card": "model_card"}
    for module in rows.values():
        assert (PACKAGE / f"{module}.py").is_file()
    # The loss lives in that one module: neither model nor the metrics compute a loss of their own.
    for module in ("modeling_aligned", "modeling_causal_lm", "metrics", "kinds"):
        text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        assert not re.search(r"\b(cross_entropy|mse_loss|binary_cross_entropy\w*|kl_div)\(", text), module


# The size limits of the package's code (docstrings included): a module, a class, a function or method.
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 500, 350, 60


def test_no_module_class_or_function_is_over_its_size_limit():
    too_long = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            lines = node.end_lineno - start + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines > limit:
                too_long.append(f"{path.name}: {node.name} has {lines} lines (limit {limit})")
    assert not too_long, "split these up:\n" + "\n".join(too_long)


def test_the_size_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{index} = {index}" for index in range(MAX_FUNCTION_LINES))
    node = ast.parse(f"def long():\n{body}\n").body[0]
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES


def test_trainer_metrics_cards_and_hub_reach_the_model_kinds_through_one_interface():
    # They never name a model class (no `isinstance(model, AlignedForCausalLM)` branches): the trainer asks
    # `kinds.find_aligned_model`, the card renderer and the Hub push ask `alignment.model_kind(config)`.
    for module in ("trainer", "metrics", "model_card", "card_data", "hub"):
        imported = package_imports(PACKAGE / f"{module}.py")
        assert not imported & {"modeling_aligned", "modeling_causal_lm"}, module
        text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        assert "AlignedForCausalLM)" not in text and "_causal_lm(" not in text, module
