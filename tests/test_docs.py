"""The README is a front door: short, both commands on its first screen, every relative link of
README.md and docs/*.md pointing at a file that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def test_readme_first_screen_has_both_commands_and_the_page_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first_screen = "\n".join(lines[:24])
    assert 'pip install -e ".[report]" && trackstar-db demo' in first_screen
    assert 'pip install -e ".[test,report]" && python -m pytest -q -x -m "not slow"' in first_screen
    assert len(lines) <= 160, len(lines)
    assert "## Commands" in "\n".join(lines) and "## Python API" in "\n".join(lines)


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
    checked, broken = 0, []
    for page in pages:
        for target in _relative_links(page):
            checked += 1
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    assert checked >= 10  # the README and the index link every doc page


def test_docs_index_lists_every_doc_page():
    listed = set(_relative_links(ROOT / "docs" / "README.md"))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= listed, pages - listed
    assert {"method.md", "formats.md", "architecture.md"} <= pages


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [gone](docs/gone.md), [web](https://example.org), [here](#top)\n```\n[x](no.md)\n```\n")
    assert _relative_links(page) == ["docs/gone.md"]


def test_code_cites_docs_that_exist():
    """References to the method document point at docs/method.md, which is in the repository."""
    cited = []
    for path in [*(ROOT / "trackstar_db").rglob("*.py"), *(ROOT / "queries").glob("*.sql")]:
        text = path.read_text(encoding="utf-8")
        assert "METHOD.md" not in text, path
        cited += [(path, m) for m in re.findall(r"docs/[a-z_]+\.md", text)]
    assert cited and all((ROOT / ref).exists() for _, ref in cited), [c for c in cited if not (ROOT / c[1]).exists()]


def test_readme_says_what_the_tool_is_before_the_commands_and_keeps_no_results_table():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = text.split("\n\n")[1]  # the paragraph after the title
    assert first.startswith("trackstar-db is ") and first.count(". ") == 0 and first.endswith("."), first
    assert text.index(first) < text.index("trackstar-db demo")
    assert "| method | MRR" not in text and "2026-" not in text  # dated figures live in benchmarks/RESULTS.md
    assert "benchmarks/RESULTS.md" in text
    assert "| method | MRR |" in (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
