"""The README's Python snippets, then those of docs/usage.md and docs/results.md, run as written, in order, in one
namespace (on the committed checkpoints); every relative link of the README and the docs leads to a file."""

import inspect
import re
from pathlib import Path

from conftest import ROOT, needs_data

PAGES_WITH_SNIPPETS = ["README.md", "docs/usage.md", "docs/results.md"]


@needs_data
def test_readme_python_snippets_run(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    count = 0
    for page in PAGES_WITH_SNIPPETS:
        for block in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S):
            exec(compile(block.replace("num_samples=16", "num_samples=4").replace("torch.randn(16,", "torch.randn(4,"),
                         page, "exec"), namespace)
            count += 1
    assert count >= 4
    assert namespace["out"].masks.shape == (1, 4, 64, 64)
    assert namespace["large_out"].masks.shape == (1, 4, 128, 128)  # usage.md: masks at the input's size
    steps = inspect.signature(namespace["pipe"].__call__).parameters["num_inference_steps"].default
    assert len(capsys.readouterr().out.splitlines()) == steps  # the step callback printed once per step


def test_every_relative_link_leads_to_a_file_or_heading():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples/research_projects/README.md"]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in {_slug(h) for h in _headings(file)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
    assert len((ROOT / "README.md").read_text()) <= 10_000  # a README a newcomer reads in minutes


def _headings(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"^#+ (.+)$", text, flags=re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_script_the_docs_name_exists():
    """`scripts/...`, `training/...`, `benchmarks/...` and `examples/...` paths in the README, the docs, the research
    README and the scripts' own headers lead to files (the research scaffolding moved to examples/research_projects/)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md")),
             *sorted((ROOT / "scripts").glob("*")), *sorted((ROOT / "examples" / "research_projects").glob("*"))]
    named = {path for page in pages for path in
             re.findall(r"(?<![\w/.])((?:scripts|training|benchmarks|examples)/[\w/]+\.(?:py|sh))", page.read_text())}
    assert len(named) > 20  # the pattern reads the pages
    assert sorted(path for path in named if not (ROOT / path).is_file()) == []
