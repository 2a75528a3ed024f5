"""The README is a short user guide and the docs hold the rest: its length, its two commands, its links, no dated
lab notes in prose (a result's provenance lives in the header of its file under bench/results)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import forensics

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [
    README,
    ROOT / "SECURITY.md",
    ROOT / "forensics" / "assets" / "demo" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
# a commit id: 7 to 40 hex digits with at least one digit and one letter, not part of a longer word, path or number
COMMIT = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])")


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the prose: outside code blocks, tables and the front matter."""
    lines, out, fenced = path.read_text(encoding="utf-8").splitlines(), [], False
    start = lines.index("---", 1) + 1 if lines and lines[0] == "---" else 0
    for number, line in enumerate(lines[start:], start + 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not line.lstrip().startswith("|"):
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for _, line in prose(path) if re.match(r"#{1,6} ", line)}


def test_the_readme_is_a_short_guide_that_links_to_the_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert text.startswith("---\ntitle: CLIP backdoor forensics\n")
    assert "sdk: gradio" in text and "app_file: app.py" in text  # the Hugging Face Space's front matter
    linked = {m.group(1).split("#")[0] for m in LINK.finditer(text)}
    for page in PAGES[1:]:
        assert page.relative_to(ROOT).as_posix() in linked, f"README does not link {page.relative_to(ROOT)}"


def test_the_readme_commands_are_the_ones_that_run():
    text = README.read_text(encoding="utf-8")
    assert "\npython3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python app.py\n" in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = ci[ci.index("# The README's test command (ruff's lint and import order first, then the suite):") + 1]
    assert command.startswith("python3 -m venv .venv && ") and command.endswith("-m pytest")
    assert f"\n{command}\n" in text, "the README's test command differs from .ci/run's"


def test_the_readme_api_example_names_the_public_api():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    called = set(re.findall(r"forensics\.(\w+)\(", block))
    assert called and called <= set(forensics.__all__), called - set(forensics.__all__)
    assert 5 <= len(block.strip().splitlines()) <= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_local_link_resolves(page):
    for number, line in prose(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            assert resolved.exists(), f"{where}: no such file"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{where}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_dates_or_commit_ids_in_prose(page):
    """A result's date and code version belong in the header of its file under bench/results, not in the docs."""
    found = [
        f"{page.relative_to(ROOT)}:{n}: {m.group(0)}"
        for n, line in prose(page)
        for m in [*DATE.finditer(line), *COMMIT.finditer(line)]
    ]
    assert not found, found


def test_the_rules_above_catch_what_they_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A heading, with `code`\n\nRun on 2026-12-05 with commit ef97673.\n\n| 2026-12-05 | ef97673 |\n"
        "```\n2026-12-05\n```\nsha256 file.safetensors, a 123456789 number, deadbee5-like words.\n"
    )
    hits = [m.group(0) for _, line in prose(page) for m in [*DATE.finditer(line), *COMMIT.finditer(line)]]
    assert hits == ["2026-12-05", "ef97673"]
    assert anchors(page) == {"a-heading-with-code"}
