"""What the tests of the benchmark scripts share: importing a script of benchmarks/, and checking that the blocks it
rendered into README and docs are a fresh rendering of its committed JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS_DIR = BENCHMARKS / "results"


def load_benchmark(script: str, module_name: str | None = None) -> ModuleType:
    """Imports benchmarks/<script>.py as `module_name` (default: the script's name), with benchmarks/ importable so
    its own imports (`common`, `recipes`) resolve."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    name = module_name or script
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def committed_results(file: str) -> dict:
    """The committed JSON benchmarks/results/<file>; the test is skipped while it is not committed."""
    path = RESULTS_DIR / file
    if not path.exists():
        pytest.skip(f"benchmarks/results/{file} is not committed yet")
    return json.loads(path.read_text(encoding="utf-8"))


def assert_documents_show(blocks: dict[str, str], documents: tuple[str, ...], fix: str) -> None:
    """Every document holds its blocks exactly as rendered, and every block appears in some document.

    A number typed into README or docs by hand, or JSON changed without re-rendering, fails here."""
    replace_blocks = sys.modules["recipes"].replace_blocks if "recipes" in sys.modules else None
    if replace_blocks is None:
        replace_blocks = load_benchmark("recipes").replace_blocks
    shown = set()
    for name in documents:
        text = (REPO / name).read_text(encoding="utf-8")
        assert replace_blocks(text, blocks) == text, f"{name} is out of date: {fix}"
        shown |= {block for block in blocks if f"<!-- BEGIN {block} -->" in text}
    assert shown == set(blocks), f"rendered blocks that no document shows: {sorted(set(blocks) - shown)}"
