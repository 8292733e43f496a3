"""docs/design.md's "where things are" map names only paths that exist."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def map_paths() -> list[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("<!-- tree-map -->", 1)[1].split("<!-- end tree-map -->", 1)[0]
    paths, stack = [], []  # stack: (indent, folder path)
    for line in block.strip().strip("`").splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or len(m.group(1)) > 10:  # a continuation line of a description
            continue
        indent, name = len(m.group(1)), m.group(2)
        if "*" in name or not re.match(r"^[\w./-]+$", name):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([stack[-1][1]] if stack else []) + ("/" if stack else "") + name.rstrip("/")
        paths.append(path)
        if name.endswith("/"):
            stack.append((indent, path))
    return paths


def test_every_path_in_the_map_exists():
    paths = map_paths()
    assert len(paths) > 40, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing
