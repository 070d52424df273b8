"""Error types of `expertmesh.policies`. Each names the field that is wrong and the fix."""

from __future__ import annotations

from collections.abc import Iterable


class PolicyError(ValueError):
    """A policy file or dict is invalid. `problems` holds one `<field path>: <message>` line per
    problem (e.g. `rules[2].then.require_models[0]: unknown model 'gpt-5'; known models: ...`);
    `source` is the file it came from (None for a dict)."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f"invalid policy {source}" if source else "invalid policy"
        count = len(self.problems)
        header = f"{where} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n  ".join([header, *self.problems]))
