"""The README and docs/: generated tables up to date, links that resolve inside the repository, and
the README's test command the same as the one .ci/run mirrors."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


def _readme_tables():
    from benchmarks import readme_tables
    return readme_tables


def _prose(path: pathlib.Path) -> str:
    """The markdown without its fenced code blocks."""
    return FENCE.sub("", path.read_text())


def _anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, -1, -2 … for
    repeats."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(_prose(path)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_generated_tables_are_current(capsys):
    tables = _readme_tables()
    assert tables.check() == 0, capsys.readouterr().err


def test_every_table_is_somewhere_and_every_marker_names_a_table():
    tables = _readme_tables()
    where = tables._where()
    assert not tables._problems(where)
    assert "headline" in where and where["headline"] == [README]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(path):
    bad = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, bad


def test_readme_test_command_is_the_one_ci_mirrors():
    ci = (ROOT / ".ci" / "run").read_text()
    mirrored = [line.lstrip("#").strip() for line in ci.splitlines()
                if line.startswith("#") and "python -m pytest" in line and "venv" in line]
    assert mirrored, ".ci/run no longer quotes the README's test command"
    commands = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    for command in mirrored:
        assert command in commands, f"README.md lacks the test command of .ci/run: {command}"


def test_readme_keeps_the_demo_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    assert any(c.endswith("&& fastedit demo") and c.startswith("python3 -m venv .venv") for c in commands)


def test_design_has_the_tree_map():
    text = (ROOT / "docs" / "design.md").read_text()
    assert text.count("<!-- tree-map -->") == 1
