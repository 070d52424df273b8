"""Config-file diagnostics: pydantic validation errors as `<field path> (line N): <message>` lines.

    try:
        spec = TopologySpec.model_validate(data)
    except ValidationError as e:
        problems = [describe_error(err, TopologySpec, schema_version=1) for err in e.errors()]
        lines = problem_lines(problems, yaml_root)   # ["nodes[1].memory_gb (line 9): must be > 0; got 0"]

Every YAML file the platform reads (topologies, policies) reports its problems in this one
format: the path of the field as the user wrote it, the line in the file when the YAML node is
known, and a message that says what to write instead. It is a leaf (pydantic and PyYAML only),
so every package that validates a file may use it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

Loc = tuple[int | str, ...]
"""A field's location as pydantic reports it, e.g. ("nodes", 2, "name")."""
Problem = tuple[Loc, str]
"""(location, message with the fix)."""
Override = Callable[[str, Loc, Any], str | None]
"""A schema's own message for (error type, location, input value); None: the shared one."""


def field_path(loc: Loc) -> str:
    """`nodes[2].name` for ("nodes", 2, "name"); `<top level>` for ()."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The schema model under `root` that validates the value at `loc`, if that value is one."""
    tp: Any = root
    for part in loc:
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if not isinstance(part, str) or part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        else:
            return None
    tp = _unwrap_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _strip_union_tags(loc: Loc) -> Loc:
    """pydantic puts the union member it tried into `loc` (e.g. 'list[...]', 'literal[...]')."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "bool"))))


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def describe_error(
    error: Mapping[str, Any],
    schema: type[BaseModel],
    *,
    schema_version: int | str | None = None,
    override: Override | None = None,
) -> Problem:
    """One pydantic error (an item of `ValidationError.errors()`) as (loc, message with the fix).
    `schema` is the root model (to list the keys a mapping allows); `schema_version` the value a
    top-level `version` key must have; `override` a schema's own wording for some errors."""
    loc = _strip_union_tags(tuple(error["loc"]))
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if override is not None and (custom := override(kind, loc, value)) is not None:
        return loc, custom
    got = f"got {value!r}"
    field = loc[-1] if loc else None
    if kind == "extra_forbidden":
        model = model_at(schema, loc[:-1])
        allowed = f"; allowed keys: {', '.join(model.model_fields)}" if model else ""
        message = f"unknown key {field!r}{allowed}"
    elif kind == "missing" and loc == ("version",) and schema_version is not None:
        message = f"required key 'version' is missing; add `version: {schema_version}`"
    elif kind == "missing":
        message = f"required key {field!r} is missing; add it"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        model = model_at(schema, loc)
        keys = f" with keys: {', '.join(model.model_fields)}" if model else ""
        message = f"must be a mapping{keys}; {got}"
    elif kind == "literal_error" and loc == ("version",) and schema_version is not None:
        message = f"unsupported version {value!r}; this release reads `version: {schema_version}`"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected')}; {got}"
    elif kind == "greater_than":
        message = f"must be > {_num(ctx['gt'])}; {got}"
    elif kind == "greater_than_equal":
        message = f"must be >= {_num(ctx['ge'])}; {got}"
    elif kind == "less_than_equal":
        message = f"must be <= {_num(ctx['le'])}; {got}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"must be a whole number; {got}"
    elif kind in ("float_type", "float_parsing", "finite_number"):
        message = f"must be a finite number; {got}"
    elif kind == "string_type":
        message = f"must be a string; {got} (quote it in YAML)"
    elif kind == "string_too_short":
        message = "must not be empty"
    elif kind == "bool_type":
        message = f"must be true or false; {got}"
    elif kind == "list_type":
        message = f"must be a list, e.g. [a, b]; {got}"
    elif kind == "too_short":
        message = f"must not be empty; give at least one entry or leave the key out; {got}"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = f"{error['msg']}; {got}"
    return loc, message


def line_of(root: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the deepest YAML node along `loc` (None without a YAML document)."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if 0 <= part < len(node.value) else None
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def problem_lines(problems: Sequence[Problem], root: yaml.Node | None = None) -> list[str]:
    """`<field path> (line N): <message>` per problem (no line when the YAML is unknown)."""
    out = []
    for loc, message in problems:
        line = line_of(root, loc)
        where = f"{field_path(loc)} (line {line})" if line else field_path(loc)
        out.append(f"{where}: {message}")
    return out
