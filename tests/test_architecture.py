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
