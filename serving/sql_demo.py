"""The bundled text-to-SQL sample: a small Shakespeare database, template questions with their
SQL, and a rule-based baseline engine.

    python -m expertmesh.serving.sql_demo --build          # writes examples/sql/shakespeare.sqlite
    python -m expertmesh.serving.sql_demo --ask "How many characters are in Hamlet?"

Provenance: every row is written by this file (no download). Titles, First Folio genre and
conventional approximate composition years of ten plays; principal characters as named in the
public-domain texts; and the act 1 scene headings (setting) of three plays as given in the
public-domain Globe edition. It is a small illustrative sample, not a complete catalogue.

`question_pairs()` generates question/SQL pairs from templates over that data, split by play
into train and held-out sets (the held-out set also has one phrasing no train template uses).
`TemplateEngine` is the rule-based baseline: it answers a prompt by matching the question
against the train templates, behind the same `Engine` protocol as a model.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .engine import EngineHealth, EngineOutput, EngineRequest, ModelCard, UnknownModel

SAMPLE_DB = Path(__file__).resolve().parents[1] / "examples" / "sql" / "shakespeare.sqlite"
"""In the source tree (the package installs editable, as `make` does)."""

PLAYS: tuple[tuple[int, str, str, int], ...] = (
    (1, "Romeo and Juliet", "tragedy", 1595),
    (2, "Hamlet", "tragedy", 1600),
    (3, "Macbeth", "tragedy", 1606),
    (4, "Othello", "tragedy", 1603),
    (5, "King Lear", "tragedy", 1605),
    (6, "A Midsummer Night's Dream", "comedy", 1595),
    (7, "Twelfth Night", "comedy", 1601),
    (8, "The Tempest", "comedy", 1610),
    (9, "Much Ado About Nothing", "comedy", 1598),
    (10, "Richard III", "history", 1592),
)

CHARACTERS: dict[int, tuple[str, ...]] = {
    1: ("Romeo", "Juliet", "Mercutio", "Tybalt", "Friar Laurence", "Nurse", "Benvolio"),
    2: ("Hamlet", "Claudius", "Gertrude", "Ophelia", "Polonius", "Horatio", "Laertes"),
    3: ("Macbeth", "Lady Macbeth", "Banquo", "Macduff", "Duncan", "Malcolm"),
    4: ("Othello", "Desdemona", "Iago", "Cassio", "Emilia", "Roderigo"),
    5: ("King Lear", "Goneril", "Regan", "Cordelia", "Edmund", "Edgar", "Gloucester", "Kent"),
    6: ("Puck", "Oberon", "Titania", "Bottom", "Hermia", "Helena", "Lysander", "Demetrius"),
    7: ("Viola", "Orsino", "Olivia", "Malvolio", "Sebastian", "Feste"),
    8: ("Prospero", "Miranda", "Ariel", "Caliban", "Ferdinand"),
    9: ("Beatrice", "Benedick", "Hero", "Claudio", "Don Pedro", "Dogberry"),
    10: ("Richard", "Buckingham", "Lady Anne", "Clarence", "Richmond"),
}

SCENES: dict[int, tuple[str, ...]] = {  # act 1 settings, scene 1 first
    1: (
        "Verona. A public place.",
        "A street.",
        "A room in Capulet's house.",
        "A street.",
        "A hall in Capulet's house.",
    ),
    2: (
        "Elsinore. A platform before the castle.",
        "A room of state in the castle.",
        "A room in Polonius' house.",
        "The platform.",
        "Another part of the platform.",
    ),
    3: (
        "A desert place.",
        "A camp near Forres.",
        "A heath.",
        "Forres. The palace.",
        "Inverness. Macbeth's castle.",
        "Before Macbeth's castle.",
        "Macbeth's castle.",
    ),
}

SCHEMA = """
CREATE TABLE plays (id INTEGER PRIMARY KEY, title TEXT NOT NULL, genre TEXT NOT NULL,
                    year INTEGER NOT NULL);
CREATE TABLE characters (id INTEGER PRIMARY KEY, play_id INTEGER NOT NULL REFERENCES plays(id),
                         name TEXT NOT NULL);
CREATE TABLE scenes (id INTEGER PRIMARY KEY, play_id INTEGER NOT NULL REFERENCES plays(id),
                     act INTEGER NOT NULL, scene INTEGER NOT NULL, setting TEXT NOT NULL);
"""


def build_sample_db(path: Path = SAMPLE_DB) -> Path:
    """Write the sample database at `path` (replacing it). Deterministic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO plays VALUES (?, ?, ?, ?)", PLAYS)
        conn.executemany(
            "INSERT INTO characters (play_id, name) VALUES (?, ?)",
            [(pid, name) for pid, names in CHARACTERS.items() for name in names],
        )
        conn.executemany(
            "INSERT INTO scenes (play_id, act, scene, setting) VALUES (?, 1, ?, ?)",
            [(pid, i + 1, s) for pid, settings in SCENES.items() for i, s in enumerate(settings)],
        )
        conn.commit()
    finally:
        conn.close()
    return path


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# (question template, SQL template); {title} and {genre} are filled in.
TRAIN_TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "How many characters are in {title}?",
        "SELECT COUNT(*) FROM characters JOIN plays ON plays.id = characters.play_id "
        "WHERE plays.title = {qtitle}",
    ),
    (
        "List the characters in {title}.",
        "SELECT characters.name FROM characters JOIN plays ON plays.id = characters.play_id "
        "WHERE plays.title = {qtitle}",
    ),
    ("What year was {title} written?", "SELECT year FROM plays WHERE title = {qtitle}"),
    ("What genre is {title}?", "SELECT genre FROM plays WHERE title = {qtitle}"),
    (
        "Which plays were written before {title}?",
        "SELECT title FROM plays WHERE year < (SELECT year FROM plays WHERE title = {qtitle})",
    ),
)
HELD_OUT_ONLY: tuple[tuple[str, str], ...] = (
    (
        "Name every character of {title}.",
        "SELECT characters.name FROM characters JOIN plays ON plays.id = characters.play_id "
        "WHERE plays.title = {qtitle}",
    ),
)
HELD_OUT_PLAYS = frozenset({"Othello", "The Tempest", "Richard III"})


@dataclass(frozen=True)
class QuestionPair:
    question: str
    sql: str


def question_pairs() -> tuple[list[QuestionPair], list[QuestionPair]]:
    """(train, held_out): every train template over every play; held-out plays go to the
    held-out set, which also gets the held-out-only phrasing."""
    train: list[QuestionPair] = []
    held: list[QuestionPair] = []
    for _, title, _, _ in PLAYS:
        fill = {"title": title, "qtitle": _q(title)}
        out = held if title in HELD_OUT_PLAYS else train
        for q, sql in TRAIN_TEMPLATES:
            out.append(QuestionPair(q.format(**fill), sql.format(**fill)))
        if title in HELD_OUT_PLAYS:
            for q, sql in HELD_OUT_ONLY:
                held.append(QuestionPair(q.format(**fill), sql.format(**fill)))
    return train, held


def template_sql(question: str, templates: Sequence[tuple[str, str]] = TRAIN_TEMPLATES) -> str:
    """The rule-based baseline: the SQL of the first template whose pattern matches the
    question, or an empty string."""
    for q, sql in templates:
        pattern = "^" + re.escape(q).replace(r"\{title\}", "(?P<title>.+?)") + "$"
        m = re.match(pattern, question.strip(), re.IGNORECASE)
        if m:
            return sql.format(title=m["title"], qtitle=_q(m["title"]))
    return ""


class TemplateEngine:
    """The rule-based baseline behind the `Engine` protocol: it reads the question out of the
    text-to-SQL prompt and answers with `template_sql`."""

    def __init__(self, name: str = "sql-templates") -> None:
        self.name = name

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard(self.name, 4096)]

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if request.model != self.name:
            raise UnknownModel(f"model {request.model!r} is not served here")
        text = request.messages[-1].content if request.messages else request.prompt or ""
        m = re.search(r"Question: (.*)\nSQL:", text)
        sql = template_sql(m.group(1)) if m else ""
        yield EngineOutput(sql, "stop", len(text) // 4, len(sql) // 4)

    def health(self) -> EngineHealth:
        return EngineHealth(True, "ok")

    async def shutdown(self) -> None:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="write the sample database")
    parser.add_argument("--db", type=Path, default=SAMPLE_DB)
    parser.add_argument("--ask", help="answer a question with the rule-based baseline")
    args = parser.parse_args(argv)
    if args.build:
        print(f"wrote {build_sample_db(args.db)}")
    if args.ask:
        from .sql import FixedModel, SqlScope, TextToSql
        from .sql_guard import SQLiteDatabase

        engine = TemplateEngine()
        service = TextToSql(engine, FixedModel(engine.name))
        answer = asyncio.run(service.answer(args.ask, SQLiteDatabase(args.db), SqlScope("cli")))
        print(answer.sql)
        for row in answer.rows:
            print(*row, sep="\t")
        print(answer.explanation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
