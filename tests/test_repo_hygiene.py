"""A clone with nothing beside it must pass `make test`: no code, test, build or CI file may read
a path outside the repository (`../shared/...`, an absolute `/work/...`, `REPO.parent / ...`).
Prose may mention such paths (a docstring citing where a fact was measured); code may not."""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"(?:^|[\s\"'=(/])(?:\.\./+)+shared\b|(?:^|[\s\"'=(])/work/")
"""A relative path up into `../shared` (the build machines' side folder) or an absolute path
into the build machine's `/work`."""
BUILD_FILES = ("Makefile", ".ci/run", "pyproject.toml", "manifests/Dockerfile")


def _repo_files() -> list[Path]:
    """Tracked files and untracked ones git does not ignore (what a commit would ship)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [REPO / p for p in out.split("\0") if p and (REPO / p).is_file()]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function, attribute)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if (
                isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                ids.add(id(stmt.value))
    return ids


def outside_reads_in_python(source: str) -> Iterator[tuple[int, str]]:
    """(line, what) for each place a Python source builds a path outside the repository: a
    string (not a docstring) naming `../shared` or `/work/`, or `<path>.parent / "shared"` and
    `<path> / ".." / ...` joins."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and OUTSIDE.search(node.value):
                yield node.lineno, repr(node.value)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in ("shared", ".."):
                yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Call) and any(
            isinstance(a, ast.Constant) and a.value == ".." for a in node.args
        ):
            yield node.lineno, ast.unparse(node)


def outside_reads_in_text(text: str) -> Iterator[tuple[int, str]]:
    """(line, text) of non-comment lines of a build or CI file that name a path outside."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("#") and OUTSIDE.search(line):
            yield number, line.strip()


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ('CRD = REPO.parent / "shared" / "kuberay-crds"\n', True),
        ('p = Path("../shared/kuberay-crds")\n', True),
        ('p = open("/work/shared/ENVIRONMENT.md")\n', True),
        ('p = Path(__file__).parents[2] / ".." / "x"\n', True),
        ('p = os.path.join(REPO, "..", "x")\n', True),
        ('"""Measured facts: ../shared/ENVIRONMENT.md."""\nx = 1\n', False),
        ('CRD = REPO / "manifests" / "crds" / "kuberay"\n', False),
        ('n_shared = cfg["n_shared_experts"]\n', False),
    ],
)
def test_detector_flags_paths_outside_the_repository(source: str, found: bool) -> None:
    assert bool(list(outside_reads_in_python(source))) is found


def test_no_python_file_reads_outside_the_repository() -> None:
    hits = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in _repo_files()
        if path.suffix == ".py" and path != Path(__file__).resolve()  # its examples are strings
        for line, what in outside_reads_in_python(path.read_text())
    ]
    assert not hits, "paths outside the repository (vendor the data instead):\n" + "\n".join(hits)


def test_no_build_or_ci_file_reads_outside_the_repository() -> None:
    hits = [
        f"{name}:{line}: {text}"
        for name in BUILD_FILES
        if (REPO / name).is_file()
        for line, text in outside_reads_in_text((REPO / name).read_text())
    ]
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_every_result_file_results_md_links_is_in_the_repository() -> None:
    """A figure in benchmarks/RESULTS.md links its JSON (`results/<name>.json`); the file must be
    there (committed by the run that produced the figure), or the figure has no data."""
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    linked = set(re.findall(r"\]\((results/[\w.-]+\.jsonl?)\)", text))
    assert linked, "RESULTS.md links no result file"
    missing = sorted(p for p in linked if not (REPO / "benchmarks" / p).is_file())
    assert not missing, f"RESULTS.md links result files that are not in benchmarks/: {missing}"
