"""docs/runbooks/: one runbook per failure mode, each with symptoms, diagnosis, remediation and
verification, and every `expertmesh` command in them parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from expertmesh.cli import build_parser
from expertmesh.observability.events import FAILURE_MODES

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "docs" / "runbooks"
EXPECTED = (*FAILURE_MODES, "rolling_upgrade")
SECTIONS = ("## Symptoms", "## Diagnosis", "## Remediation", "## Verification")
DOCS_WITH_COMMANDS = (*sorted(RUNBOOKS.glob("*.md")), REPO / "docs" / "deploy-kubernetes.md")

_FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)^\s*```", re.S | re.M)
_COMMAND_START = re.compile(r"(?:^|&&|\|\||;|\s--\s)\s*expertmesh\s")


def code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks, with backslash continuations joined."""
    lines: list[str] = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split("  #", 1)[0].rstrip())
    return lines


def expertmesh_commands(text: str) -> list[str]:
    """Each `expertmesh ...` command of the code blocks: at the start of a line, after `&&`,
    `;` or `|`, or after the `--` of `kubectl exec POD --`."""
    commands = []
    for line in code_lines(text):
        for m in _COMMAND_START.finditer(line):
            rest = line[m.end() :]
            rest = re.split(r"\s(?:&&|\|\||;|\|)\s", rest, maxsplit=1)[0]
            commands.append(re.sub(r"\s+", " ", "expertmesh " + rest.strip().rstrip("'")))
    return commands


def test_command_extraction_finds_commands_after_kubectl_exec_and_in_continued_lines():
    text = (
        "```bash\n"
        "expertmesh policy check p.yaml  # comment\n"
        "kubectl exec $HEAD -- expertmesh logs --request R --dir /d\n"
        "expertmesh manifests render --topology t.yaml \\\n    --out o && kubectl apply -k o\n"
        "kubectl get configmap expertmesh-config\n"
        "```\n"
    )
    assert expertmesh_commands(text) == [
        "expertmesh policy check p.yaml",
        "expertmesh logs --request R --dir /d",
        "expertmesh manifests render --topology t.yaml --out o",
    ]


def test_there_is_one_runbook_per_failure_mode_and_one_for_rolling_upgrades():
    present = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert present == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_runbook_has_symptoms_diagnosis_remediation_and_verification_with_commands(name):
    text = (RUNBOOKS / f"{name}.md").read_text()
    positions = [text.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions), f"{name}: sections {SECTIONS}"
    assert positions == sorted(positions)
    for start, end in zip(positions, [*positions[1:], len(text)]):
        section = text[start:end]
        if section.startswith("## Symptoms"):
            assert "`" in section, f"{name}: symptoms name no metric or alert"
        else:
            assert "```" in section or "README.md#conventions" in section, (
                f"{name}: {section.splitlines()[0]} has no command"
            )


@pytest.mark.parametrize("doc", DOCS_WITH_COMMANDS, ids=lambda p: p.name)
def test_every_expertmesh_command_in_the_docs_parses(doc):
    parser = build_parser()
    commands = expertmesh_commands(doc.read_text())
    assert commands or doc.parent == RUNBOOKS, f"{doc.name}: no expertmesh command found"
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{doc.name}: `{command}` does not parse (exit {e.code})")
        assert callable(args.func), command


def test_the_runbooks_use_many_expertmesh_commands():
    commands = [c for p in RUNBOOKS.glob("*.md") for c in expertmesh_commands(p.read_text())]
    subcommands = {shlex.split(c)[1] for c in commands}
    assert {"manifests", "cluster", "policy", "logs", "chaos"} <= subcommands


def test_every_alert_names_a_failure_mode_whose_runbook_mentions_it():
    rule = yaml.safe_load((REPO / "manifests" / "base" / "prometheusrule.yaml").read_text())
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            mode = alert["labels"]["failure_mode"]
            assert mode in FAILURE_MODES
            assert alert["annotations"]["runbook_url"] == f"docs/runbooks/{mode}.md"
            assert alert["alert"] in (RUNBOOKS / f"{mode}.md").read_text()


def test_repository_files_named_in_expertmesh_commands_exist():
    """`manifests/...` and `examples/...` paths in the commands are files of this repository."""
    for doc in DOCS_WITH_COMMANDS:
        for command in expertmesh_commands(doc.read_text()):
            for word in shlex.split(command):
                if word.startswith(("manifests/", "examples/")):
                    assert (REPO / word).exists(), f"{doc.name}: `{command}` names {word}"
