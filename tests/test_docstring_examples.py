"""The `>>>` examples in hf_aligned's docstrings import every module they use (`torch`, `np`, ...); names of the
objects an example presumes (a `model`, a `batch`) are the reader's."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil

import pytest

import hf_aligned

# Modules (by the names examples use for them) that an example must import itself.
MODULE_NAMES = {"torch", "np", "numpy", "F", "nn", "datasets", "transformers", "pipeline", "hf_aligned"}


def docstring_examples() -> list[tuple[str, str]]:
    """(where, code) of every docstring example in the package."""
    examples = []
    for info in pkgutil.iter_modules(hf_aligned.__path__):
        module = importlib.import_module(f"hf_aligned.{info.name}")
        objects = [
            module,
            *(value for value in vars(module).values() if getattr(value, "__module__", None) == module.__name__),
        ]
        objects += [member for obj in list(objects) if inspect.isclass(obj) for member in vars(obj).values()]
        for obj in objects:
            doc = (
                inspect.getdoc(obj)
                if not isinstance(obj, (staticmethod, classmethod))
                else inspect.getdoc(obj.__func__)
            )
            lines = [
                line.strip()[4:] for line in (doc or "").splitlines() if line.strip().startswith((">>> ", "... "))
            ]
            if lines:
                examples.append((f"{module.__name__}.{getattr(obj, '__qualname__', '')}", "\n".join(lines)))
    return examples


def undefined_module_names(code: str) -> set[str]:
    tree = ast.parse(code)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return (used - defined) & MODULE_NAMES


def test_the_package_has_docstring_examples():
    assert len(docstring_examples()) >= 5


@pytest.mark.parametrize(("where", "code"), docstring_examples(), ids=lambda value: str(value)[:60])
def test_docstring_examples_import_the_modules_they_use(where, code):
    assert not undefined_module_names(code), f"{where} uses {undefined_module_names(code)} without importing it"
