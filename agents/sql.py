"""Text-to-SQL: a question over a database, answered by a model the selector chooses, with the
SQL checked before it runs.

    service = TextToSql(engine, SelectorChooser(selector))
    answer = await service.answer("How many characters are in Hamlet?",
                                  SQLiteDatabase("examples/sql/shakespeare.sqlite"),
                                  SqlScope(tenant="anonymous"))
    answer.sql, answer.columns, answer.rows, answer.explanation

Steps: link the question to the schema (tables whose table or column names share a word with
the question, within the caller's scope; all scoped tables when none match) and to the data
(text values of those tables that the question names, e.g. `plays.title = 'Othello'`, so the
model copies a literal exactly as stored), prompt the model with those tables' CREATE
statements and the linked values through the `Engine` protocol, extract the SQL from the
reply, check it (`sql_guard.check_sql`: one read-only query, scoped tables, row limit) and run
it read-only with a timeout. A refusal or execution error is fed back to the model once, with
the error, for a repair; a second failure raises `SqlAnswerFailed` carrying both attempts.

The model is chosen by a `ModelChooser`: `SelectorChooser` asks the selector with task type
`sql` (so the tenant's budgets, residency and safety rules apply); `FixedModel` names one
(benchmarks, tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from expertmesh.models.generate import SamplingParams
from expertmesh.routing import SelectionRequest, Selector, redact_pii
from expertmesh.serving.engine import Engine, EngineRequest, Message

from .sql_guard import (
    GuardedQuery,
    QueryResult,
    SqlDatabase,
    SqlError,
    SqlExecutionError,
    SqlRefused,
    check_sql,
)


@dataclass(frozen=True)
class SqlScope:
    """Who asks, and what they may read."""

    tenant: str
    """Selector tenant the model call is charged to."""
    allowed_tables: frozenset[str] | None = None
    """Tables the caller may query; None: every table of the database."""
    row_limit: int = 100
    timeout_s: float = 2.0
    agent: str | None = None
    """The calling agent (MCP), for logs and spans."""


@dataclass(frozen=True)
class SqlAttempt:
    sql: str
    error: str | None


@dataclass(frozen=True)
class SqlAnswer:
    question: str
    sql: str
    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]
    truncated: bool
    explanation: str
    model: str
    linked_tables: tuple[str, ...]
    attempts: tuple[SqlAttempt, ...]
    linked_values: tuple[str, ...] = ()
    """`table.column = 'value'` hints the prompt carried."""
    grounded: tuple[str, ...] = ()
    """Literals value grounding replaced (`ground_literals`), `table.column: 'old' -> 'new'`."""

    def to_dict(self) -> dict[str, object]:
        return {
            "question": self.question,
            "sql": self.sql,
            "columns": list(self.columns),
            "rows": [list(r) for r in self.rows],
            "truncated": self.truncated,
            "explanation": self.explanation,
            "model": self.model,
            "linked_tables": list(self.linked_tables),
            "linked_values": list(self.linked_values),
            "grounded": list(self.grounded),
            "attempts": [dataclasses.asdict(a) for a in self.attempts],
        }


class SqlAnswerFailed(SqlError):
    """Both the first query and the repair failed; `attempts` has each SQL and its error."""

    def __init__(self, question: str, attempts: Sequence[SqlAttempt]) -> None:
        errors = "; ".join(f"attempt {i + 1}: {a.error}" for i, a in enumerate(attempts))
        super().__init__(f"could not answer {question!r}: {errors or 'no attempt'}")
        self.attempts = tuple(attempts)


@dataclass
class ModelChoice:
    model: str
    max_tokens: int
    rewrite: Callable[[str], str] | None = None
    settle: Callable[[int, int], None] | None = None
    release: Callable[[], None] | None = None


class ModelChooser(Protocol):
    def choose(self, tenant: str, prompt: str, max_tokens: int) -> ModelChoice: ...


class FixedModel:
    """Always the named model (no selector: benchmarks and tests)."""

    def __init__(self, model: str) -> None:
        self.model = model

    def choose(self, tenant: str, prompt: str, max_tokens: int) -> ModelChoice:
        return ModelChoice(self.model, max_tokens)


class SelectorChooser:
    """The selector chooses, with the request classified as task type `sql`; raises the
    selector's `RoutingError`s (Denied, BudgetExceeded, ...)."""

    def __init__(self, selector: Selector) -> None:
        self.selector = selector

    def choose(self, tenant: str, prompt: str, max_tokens: int) -> ModelChoice:
        c = dataclasses.replace(self.selector.classify(prompt), task="sql")
        decision = self.selector.decide(
            SelectionRequest(tenant=tenant, prompt=prompt, max_tokens=max_tokens, classification=c)
        )
        selector = self.selector
        kinds = decision.redact_pii

        def settle(prompt_tokens: int, completion_tokens: int) -> None:
            selector.settle(decision, prompt_tokens, completion_tokens)

        return ModelChoice(
            decision.model.name,
            decision.max_tokens,
            rewrite=(lambda t: redact_pii(t, kinds)) if kinds else None,
            settle=settle,
            release=lambda: selector.release(decision),
        )


_WORDS = re.compile(r"[a-z0-9]+")


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _words(text: str) -> set[str]:
    return {_stem(w) for w in _WORDS.findall(text.lower())}


def link_schema(
    question: str, schema: Mapping[str, Sequence[str]], allowed: frozenset[str] | None = None
) -> tuple[str, ...]:
    """Tables relevant to `question`: those whose name or a column name shares a word with it
    (plural-insensitive), within `allowed`; every allowed table when none share one. Tables
    reached from a linked table by an `<table>_id` column are added, so joins are possible."""
    scoped = [t for t in schema if allowed is None or t.lower() in {a.lower() for a in allowed}]
    q = _words(question)
    linked = []
    for table in scoped:
        names = _words(table.replace("_", " "))
        for column in schema[table]:
            names |= _words(column.replace("_", " "))
        if q & (names - {"id", "name"}) or q & _words(table):
            linked.append(table)
    if not linked:
        return tuple(scoped)
    for table in list(linked):
        for column in schema[table]:
            if column.endswith("_id"):
                target = next(
                    (t for t in scoped if _stem(t.lower()) == _stem(column[:-3].lower())), None
                )
                if target is not None and target not in linked:
                    linked.append(target)
    return tuple(t for t in scoped if t in linked)


VALUE_SCAN_ROWS = 1000
"""Columns with more distinct values than this are not scanned for values (too costly)."""


@dataclass(frozen=True)
class LinkedValue:
    table: str
    column: str
    value: str

    def render(self, dialect: str) -> str:
        return f"{self.table}.{self.column} = {exp.Literal.string(self.value).sql(dialect)}"


def link_values(
    question: str,
    db: SqlDatabase,
    tables: Sequence[str],
    allowed: frozenset[str] | None = None,
    timeout_s: float = 2.0,
) -> tuple[LinkedValue, ...]:
    """Text values stored in `tables` that `question` names (case-insensitive, whole words),
    in question order. A value inside a longer linked one ("Richard" in "Richard III") is
    dropped. Columns are read through the guard and the read-only runner; a column with more
    than `VALUE_SCAN_ROWS` distinct values, or whose scan fails, is skipped."""
    text = question.lower()
    schema = db.schema()
    spans: list[tuple[int, int, LinkedValue]] = []
    for table in tables:
        for column in schema[table]:
            if column.lower() == "id" or column.lower().endswith("_id"):
                continue
            scan = (
                exp.select(exp.column(column, quoted=True))
                .distinct()
                .from_(exp.table_(table, quoted=True))
            )
            try:
                query = check_sql(
                    scan.sql(db.dialect), tuple(schema), allowed, VALUE_SCAN_ROWS, db.dialect
                )
                result = db.execute(query, timeout_s)
            except SqlError:
                continue
            if result.truncated:
                continue
            for (value,) in result.rows:
                if not isinstance(value, str) or len(value) < 3:
                    continue
                pattern = r"(?<!\w)" + re.escape(value.lower()) + r"(?!\w)"
                for m in re.finditer(pattern, text):
                    spans.append((m.start(), m.end(), LinkedValue(table, column, value)))
    kept = [
        (start, end, v)
        for start, end, v in spans
        if not any(s <= start and end <= e and e - s > end - start for s, e, _ in spans)
    ]
    ordered = sorted(kept, key=lambda x: (x[0], x[2].table, x[2].column))
    return tuple(dict.fromkeys(v for _, _, v in ordered))


def ground_literals(
    sql: str, values: Sequence[LinkedValue], schema: Mapping[str, Sequence[str]], dialect: str
) -> tuple[str, tuple[str, ...]]:
    """Value grounding: in `column = 'literal'` comparisons where the question linked exactly
    one stored value of that column and the literal is not it, put the stored value in. Returns
    the SQL (unchanged when nothing was replaced, or when it does not parse: the guard reports
    that) and one `table.column: 'old' -> 'new'` line per replacement.

    It fixes what models commonly get wrong about literals (case, spelling, a title recalled
    instead of the one asked about) without guessing: with two linked values of a column, or
    none, nothing changes."""
    by_column: dict[tuple[str, str], list[str]] = {}
    for v in values:
        by_column.setdefault((v.table.lower(), v.column.lower()), []).append(v.value)
    try:
        tree = sqlglot.parse_one(sql, read=dialect)
    except SqlglotError:
        return sql, ()
    if tree is None:
        return sql, ()
    aliases = {t.alias_or_name.lower(): t.name.lower() for t in tree.find_all(exp.Table)}
    columns = {t.lower(): {c.lower() for c in cs} for t, cs in schema.items()}
    changes = []
    for eq in list(tree.find_all(exp.EQ)):
        column, literal = eq.this, eq.expression
        if isinstance(column, exp.Literal):
            column, literal = literal, column
        if not (isinstance(column, exp.Column) and isinstance(literal, exp.Literal)):
            continue
        if not literal.is_string:
            continue
        name = column.name.lower()
        if column.table:
            tables = [aliases.get(column.table.lower(), column.table.lower())]
        else:
            tables = [t for t in set(aliases.values()) if name in columns.get(t, set())]
        if len(tables) != 1:
            continue
        linked = by_column.get((tables[0], name), [])
        if len(linked) == 1 and literal.this != linked[0]:
            literal.replace(exp.Literal.string(linked[0]))
            changes.append(
                f"{tables[0]}.{name}: {literal.sql(dialect)} -> "
                f"{exp.Literal.string(linked[0]).sql(dialect)}"
            )
    return (tree.sql(dialect) if changes else sql), tuple(changes)


@dataclass(frozen=True)
class PreparedPrompt:
    tables: tuple[str, ...]
    values: tuple[LinkedValue, ...]
    messages: tuple[Message, ...]


def prepare_prompt(
    question: str, db: SqlDatabase, allowed: frozenset[str] | None = None, timeout_s: float = 2.0
) -> PreparedPrompt:
    """Schema and value linking, then the prompt: what the service sends the model (and what
    the demo model was fine-tuned on, `sql_demo.sft_records`)."""
    tables = link_schema(question, db.schema(), allowed)
    if not tables:
        raise SqlRefused("the caller's scope allows no table of this database")
    values = link_values(question, db, tables, allowed, timeout_s)
    hints = "; ".join(v.render(db.dialect) for v in values)
    return PreparedPrompt(tables, values, build_prompt(question, db.ddl(tables), db.dialect, hints))


SYSTEM_PROMPT = (
    "You translate a question into one {dialect} SELECT statement over the schema given. "
    "Answer with the SQL only, no explanation. Never modify data."
)


def build_prompt(question: str, ddl: str, dialect: str, values: str = "") -> tuple[Message, ...]:
    linked = f"Values: {values}\n\n" if values else ""
    return (
        Message("system", SYSTEM_PROMPT.format(dialect=dialect)),
        Message("user", f"Schema:\n{ddl}\n\n{linked}Question: {question}\nSQL:"),
    )


def repair_prompt(messages: tuple[Message, ...], sql: str, error: str) -> tuple[Message, ...]:
    return (
        *messages,
        Message("assistant", sql),
        Message(
            "user",
            f"That SQL failed: {error}\nWrite a corrected single SELECT statement. SQL only.",
        ),
    )


_FENCE = re.compile(r"```(?:sql)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_sql(reply: str) -> str:
    """The SQL in a model reply: a fenced block's content if there is one, else the text from
    the first SELECT/WITH on."""
    m = _FENCE.search(reply)
    text = m.group(1) if m else reply
    start = re.search(r"\b(select|with)\b", text, re.IGNORECASE)
    if start is not None and not m:
        text = text[start.start() :]
    return text.strip()


def explain(query: GuardedQuery, result: QueryResult, dialect: str = "sqlite") -> str:
    """A plain-language account of what the query did, read from its syntax tree."""
    try:
        tree = sqlglot.parse_one(query.sql, read=dialect)
    except SqlglotError:
        tree = None
    parts = [f"Read {', '.join(sorted(query.tables)) or 'no table'}"]
    if tree is not None:
        if tree.find(exp.Join):
            parts.append("joined them")
        if tree.find(exp.Where):
            parts.append("filtered rows")
        if tree.find(exp.Group):
            parts.append("grouped them")
        if tree.find(exp.AggFunc):
            parts.append("computed aggregates")
        if tree.find(exp.Order):
            parts.append("sorted the result")
    text = ", ".join(parts) + f"; {len(result.rows)} row(s)"
    if result.truncated:
        text += f", cut at the row limit of {query.row_limit}"
    return text + "."


class TextToSql:
    """The service. `engine` serves the models the chooser may pick."""

    def __init__(
        self,
        engine: Engine,
        chooser: ModelChooser,
        max_tokens: int = 128,
        repairs: int = 1,
        ground_values: bool = True,
    ) -> None:
        self.engine = engine
        self.chooser = chooser
        self.max_tokens = max_tokens
        self.repairs = repairs
        self.ground_values = ground_values

    async def answer(self, question: str, db: SqlDatabase, scope: SqlScope) -> SqlAnswer:
        if not question.strip():
            raise SqlRefused("the question is empty")
        # Database calls run in a thread: a query may take up to its timeout, and the replica's
        # event loop also streams every other request.
        schema = await asyncio.to_thread(db.schema)
        if scope.allowed_tables is not None:
            unknown = {t.lower() for t in scope.allowed_tables} - {t.lower() for t in schema}
            if unknown:
                raise SqlRefused(f"scope names tables the database lacks: {sorted(unknown)}")
        prepared = await asyncio.to_thread(
            prepare_prompt, question, db, scope.allowed_tables, scope.timeout_s
        )
        tables, messages = prepared.tables, prepared.messages
        choice = self.chooser.choose(
            scope.tenant, "\n".join(m.content for m in messages), self.max_tokens
        )
        attempts: list[SqlAttempt] = []
        tokens = [0, 0]  # prompt, completion: summed over the attempts, settled once
        try:
            for attempt in range(1 + self.repairs):
                sql = extract_sql(await self._generate(choice, messages, tokens))
                grounded: tuple[str, ...] = ()
                if self.ground_values and prepared.values:
                    sql, grounded = ground_literals(sql, prepared.values, schema, db.dialect)
                try:
                    query = check_sql(
                        sql, tuple(schema), scope.allowed_tables, scope.row_limit, db.dialect
                    )
                    result = await asyncio.to_thread(db.execute, query, scope.timeout_s)
                except (SqlRefused, SqlExecutionError) as e:
                    attempts.append(SqlAttempt(sql, str(e)))
                    if attempt < self.repairs:
                        messages = repair_prompt(messages, sql, str(e))
                    continue
                attempts.append(SqlAttempt(query.sql, None))
                return SqlAnswer(
                    question,
                    query.sql,
                    result.columns,
                    result.rows,
                    result.truncated,
                    explain(query, result, db.dialect)
                    + (f" Value grounding: {'; '.join(grounded)}." if grounded else ""),
                    choice.model,
                    tables,
                    tuple(attempts),
                    tuple(v.render(db.dialect) for v in prepared.values),
                    grounded,
                )
            raise SqlAnswerFailed(question, attempts)
        except BaseException:
            if choice.release is not None and tokens == [0, 0]:
                choice.release()
                choice.settle = None
            raise
        finally:
            if choice.settle is not None:
                choice.settle(tokens[0], tokens[1])

    async def _generate(
        self, choice: ModelChoice, messages: tuple[Message, ...], tokens: list[int]
    ) -> str:
        rewrite = choice.rewrite or (lambda t: t)
        request = EngineRequest(
            request_id=f"sql-{uuid.uuid4().hex[:12]}",
            model=choice.model,
            params=SamplingParams(max_tokens=choice.max_tokens, temperature=0.0),
            messages=tuple(Message(m.role, rewrite(m.content)) for m in messages),
        )
        parts = []
        async for out in self.engine.generate(request):
            parts.append(out.text)
            if out.finish_reason is not None:
                tokens[0] += out.prompt_tokens
                tokens[1] += out.completion_tokens
        return "".join(parts)
