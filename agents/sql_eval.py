"""Held-out text-to-SQL questions of shapes the fine-tuning data never had, and how an answer is
scored against them.

    from expertmesh.agents.sql_eval import HELD_OUT_SHAPES, rows_match, sql_shape

`sql_demo.question_pairs()` holds out three plays, but its held-out questions are the train
templates with another title (15 of 18) plus one new phrasing of a train query: it measures
copying a title, not writing SQL. `HELD_OUT_SHAPES` is written the other way round: every
question asks for a query whose shape (the SQL with every literal masked, `sql_shape`) no
fine-tuning pair has, in a wording no train template or paraphrase matches, over the same
sample database (`sql_demo.build_sample_db`). They cover joins the other way round and through
`scenes`, aggregates (`COUNT`/`MIN`/`MAX`/`AVG`, `GROUP BY`, `HAVING`), negation (`!=`,
`NOT IN`, `NOT EXISTS`, `NOT BETWEEN`), ordering with `LIMIT`, `DISTINCT`, `LIKE`, `BETWEEN`,
self-joins and scalar subqueries. Each carries its gold SQL and its expected rows, written by
hand from the data in `sql_demo` (`tests/agents/test_sql_eval.py` executes every gold SQL and
checks it returns them, and checks no shape or wording appears in the fine-tuning data).

The set was written before any model was trained on it and must stay out of every
fine-tuning set: it is for measuring only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError


@dataclass(frozen=True)
class HeldOutQuestion:
    question: str
    sql: str
    """Gold SQL (SQLite) over the sample database."""
    expected: tuple[tuple[object, ...], ...]
    """The rows the gold SQL must return, written from the data (not from running the SQL)."""
    features: tuple[str, ...]
    """What the query needs: `join`, `aggregate`, `group`, `having`, `negation`, `order`,
    `limit`, `distinct`, `like`, `between`, `subquery`, `self-join`."""
    ordered: bool = False
    """The question asks for an order: rows must match in order, not only as a multiset."""


def _rows(*values: object) -> tuple[tuple[object, ...], ...]:
    """One-column rows."""
    return tuple((v,) for v in values)


_PC = "plays JOIN characters ON characters.play_id = plays.id"

HELD_OUT_SHAPES: tuple[HeldOutQuestion, ...] = (
    # --- aggregates over plays, no join ---------------------------------------------------
    HeldOutQuestion(
        "How many plays are tragedies?",
        "SELECT COUNT(*) FROM plays WHERE genre = 'tragedy'",
        _rows(5),
        ("aggregate",),
    ),
    HeldOutQuestion(
        "How many plays of each genre are there?",
        "SELECT genre, COUNT(*) FROM plays GROUP BY genre",
        (("comedy", 4), ("history", 1), ("tragedy", 5)),
        ("aggregate", "group"),
    ),
    HeldOutQuestion(
        "What is the earliest year in which any of the plays was written?",
        "SELECT MIN(year) FROM plays",
        _rows(1592),
        ("aggregate",),
    ),
    HeldOutQuestion(
        "In what year was the most recent comedy written?",
        "SELECT MAX(year) FROM plays WHERE genre = 'comedy'",
        _rows(1610),
        ("aggregate",),
    ),
    HeldOutQuestion(
        "What is the average year of composition of the tragedies?",
        "SELECT AVG(year) FROM plays WHERE genre = 'tragedy'",
        _rows(1601.8),
        ("aggregate",),
    ),
    HeldOutQuestion(
        "What genres are there?",
        "SELECT DISTINCT genre FROM plays",
        _rows("comedy", "history", "tragedy"),
        ("distinct",),
    ),
    # --- aggregates over a join -------------------------------------------------------------
    HeldOutQuestion(
        "How many characters are there in all the comedies together?",
        f"SELECT COUNT(*) FROM {_PC} WHERE plays.genre = 'comedy'",
        _rows(25),
        ("join", "aggregate"),
    ),
    HeldOutQuestion(
        "For each play, how many characters does it have?",
        f"SELECT plays.title, COUNT(*) FROM {_PC} GROUP BY plays.title",
        (
            ("A Midsummer Night's Dream", 8),
            ("Hamlet", 7),
            ("King Lear", 8),
            ("Macbeth", 6),
            ("Much Ado About Nothing", 6),
            ("Othello", 6),
            ("Richard III", 5),
            ("Romeo and Juliet", 7),
            ("The Tempest", 5),
            ("Twelfth Night", 6),
        ),
        ("join", "aggregate", "group"),
    ),
    HeldOutQuestion(
        "Which plays have more than seven characters?",
        f"SELECT plays.title FROM {_PC} GROUP BY plays.title HAVING COUNT(*) > 7",
        _rows("A Midsummer Night's Dream", "King Lear"),
        ("join", "aggregate", "group", "having"),
    ),
    HeldOutQuestion(
        "How many scenes of act 1 of Macbeth are in the database?",
        "SELECT COUNT(*) FROM scenes JOIN plays ON plays.id = scenes.play_id "
        "WHERE plays.title = 'Macbeth' AND scenes.act = 1",
        _rows(7),
        ("join", "aggregate"),
    ),
    HeldOutQuestion(
        "What is the total number of characters in tragedies written after 1600?",
        f"SELECT COUNT(*) FROM {_PC} WHERE plays.genre = 'tragedy' AND plays.year > 1600",
        _rows(20),
        ("join", "aggregate"),
    ),
    HeldOutQuestion(
        "Which tragedy has the most characters?",
        f"SELECT plays.title FROM {_PC} WHERE plays.genre = 'tragedy' GROUP BY plays.title "
        "ORDER BY COUNT(*) DESC LIMIT 1",
        _rows("King Lear"),
        ("join", "aggregate", "group", "order", "limit"),
    ),
    HeldOutQuestion(
        "Which plays have more characters than Hamlet?",
        f"SELECT plays.title FROM {_PC} GROUP BY plays.title HAVING COUNT(*) > "
        f"(SELECT COUNT(*) FROM {_PC} WHERE plays.title = 'Hamlet')",
        _rows("A Midsummer Night's Dream", "King Lear"),
        ("join", "aggregate", "group", "having", "subquery"),
    ),
    # --- ordering and limits ----------------------------------------------------------------
    HeldOutQuestion(
        "List the comedies from oldest to newest.",
        "SELECT title FROM plays WHERE genre = 'comedy' ORDER BY year",
        _rows(
            "A Midsummer Night's Dream", "Much Ado About Nothing", "Twelfth Night", "The Tempest"
        ),
        ("order",),
        ordered=True,
    ),
    HeldOutQuestion(
        "Which play was written most recently?",
        "SELECT title FROM plays ORDER BY year DESC LIMIT 1",
        _rows("The Tempest"),
        ("order", "limit"),
    ),
    HeldOutQuestion(
        "What are the three oldest plays?",
        "SELECT title FROM plays ORDER BY year LIMIT 3",
        _rows("Richard III", "Romeo and Juliet", "A Midsummer Night's Dream"),
        ("order", "limit"),
    ),
    HeldOutQuestion(
        "List the characters of Hamlet in alphabetical order.",
        f"SELECT characters.name FROM {_PC} WHERE plays.title = 'Hamlet' ORDER BY characters.name",
        _rows("Claudius", "Gertrude", "Hamlet", "Horatio", "Laertes", "Ophelia", "Polonius"),
        ("join", "order"),
        ordered=True,
    ),
    # --- negation ---------------------------------------------------------------------------
    HeldOutQuestion(
        "Which plays are not tragedies?",
        "SELECT title FROM plays WHERE genre != 'tragedy'",
        _rows(
            "A Midsummer Night's Dream",
            "Twelfth Night",
            "The Tempest",
            "Much Ado About Nothing",
            "Richard III",
        ),
        ("negation",),
    ),
    HeldOutQuestion(
        "Which plays have no scenes in the database?",
        "SELECT title FROM plays WHERE id NOT IN (SELECT play_id FROM scenes)",
        _rows(
            "Othello",
            "King Lear",
            "A Midsummer Night's Dream",
            "Twelfth Night",
            "The Tempest",
            "Much Ado About Nothing",
            "Richard III",
        ),
        ("negation", "subquery"),
    ),
    HeldOutQuestion(
        "Which tragedies were not written between 1600 and 1699?",
        "SELECT title FROM plays WHERE genre = 'tragedy' AND year NOT BETWEEN 1600 AND 1699",
        _rows("Romeo and Juliet"),
        ("negation", "between"),
    ),
    HeldOutQuestion(
        "Which genres have no play written after 1605?",
        "SELECT DISTINCT genre FROM plays WHERE genre NOT IN "
        "(SELECT genre FROM plays WHERE year > 1605)",
        _rows("history"),
        ("negation", "distinct", "subquery"),
    ),
    HeldOutQuestion(
        "Which comedies have no character called Puck?",
        "SELECT title FROM plays WHERE genre = 'comedy' AND NOT EXISTS (SELECT 1 FROM "
        "characters WHERE characters.play_id = plays.id AND characters.name = 'Puck')",
        _rows("Twelfth Night", "The Tempest", "Much Ado About Nothing"),
        ("negation", "subquery"),
    ),
    # --- filters: ranges and patterns -------------------------------------------------------
    HeldOutQuestion(
        "Which plays were written between 1598 and 1603?",
        "SELECT title FROM plays WHERE year BETWEEN 1598 AND 1603",
        _rows("Much Ado About Nothing", "Hamlet", "Twelfth Night", "Othello"),
        ("between",),
    ),
    HeldOutQuestion(
        "Which characters have a name starting with B?",
        "SELECT name FROM characters WHERE name LIKE 'B%'",
        _rows("Benvolio", "Banquo", "Bottom", "Beatrice", "Benedick", "Buckingham"),
        ("like",),
    ),
    HeldOutQuestion(
        "Which scene settings mention a castle?",
        "SELECT setting FROM scenes WHERE setting LIKE '%castle%'",
        _rows(
            "Elsinore. A platform before the castle.",
            "A room of state in the castle.",
            "Inverness. Macbeth's castle.",
            "Before Macbeth's castle.",
            "Macbeth's castle.",
        ),
        ("like",),
    ),
    HeldOutQuestion(
        "Which plays have a scene set in a street?",
        "SELECT DISTINCT plays.title FROM plays JOIN scenes ON scenes.play_id = plays.id "
        "WHERE scenes.setting LIKE '%street%'",
        _rows("Romeo and Juliet"),
        ("join", "distinct", "like"),
    ),
    # --- joins the other way round (from a character or a scene to its play) ----------------
    HeldOutQuestion(
        "In which play does Ophelia appear?",
        f"SELECT plays.title FROM {_PC} WHERE characters.name = 'Ophelia'",
        _rows("Hamlet"),
        ("join",),
    ),
    HeldOutQuestion(
        "To which genre does the play with Prospero in it belong?",
        f"SELECT plays.genre FROM {_PC} WHERE characters.name = 'Prospero'",
        _rows("comedy"),
        ("join",),
    ),
    HeldOutQuestion(
        "Who appears in a play written before 1596?",
        f"SELECT characters.name FROM {_PC} WHERE plays.year < 1596",
        _rows(
            "Romeo",
            "Juliet",
            "Mercutio",
            "Tybalt",
            "Friar Laurence",
            "Nurse",
            "Benvolio",
            "Puck",
            "Oberon",
            "Titania",
            "Bottom",
            "Hermia",
            "Helena",
            "Lysander",
            "Demetrius",
            "Richard",
            "Buckingham",
            "Lady Anne",
            "Clarence",
            "Richmond",
        ),
        ("join",),
    ),
    HeldOutQuestion(
        "What is the setting of act 1, scene 3 of Hamlet?",
        "SELECT scenes.setting FROM scenes JOIN plays ON plays.id = scenes.play_id "
        "WHERE plays.title = 'Hamlet' AND scenes.act = 1 AND scenes.scene = 3",
        _rows("A room in Polonius' house."),
        ("join",),
    ),
    HeldOutQuestion(
        "Which characters share a play with Iago?",
        "SELECT other.name FROM characters AS iago JOIN characters AS other "
        "ON other.play_id = iago.play_id WHERE iago.name = 'Iago' AND other.name != 'Iago'",
        _rows("Othello", "Desdemona", "Cassio", "Emilia", "Roderigo"),
        ("self-join", "negation"),
    ),
    HeldOutQuestion(
        "Which plays were written later than the average year of all the plays?",
        "SELECT title FROM plays WHERE year > (SELECT AVG(year) FROM plays)",
        _rows("Macbeth", "Othello", "King Lear", "Twelfth Night", "The Tempest"),
        ("aggregate", "subquery"),
    ),
)


def sql_shape(sql: str, mask_numbers: bool = True, dialect: str = "sqlite") -> str:
    """The query with its literals masked (strings always, numbers when `mask_numbers`), as
    sqlglot prints it: two queries with the same shape differ only in the values they compare.
    Unparseable SQL is returned as it is."""
    try:
        tree = sqlglot.parse_one(sql, read=dialect)
    except SqlglotError:
        return sql
    if tree is None:
        return sql
    for literal in list(tree.find_all(exp.Literal)):
        if literal.is_string:
            literal.replace(exp.Literal.string("?"))
        elif mask_numbers:
            literal.replace(exp.Literal.number(0))
    return tree.sql(dialect)


def _cell(value: object) -> object:
    """Floats to 6 significant decimals (AVG in one engine vs another), everything else as is."""
    return round(value, 6) if isinstance(value, float) else value


def rows_match(
    got: Sequence[Sequence[object]], expected: Sequence[Sequence[object]], ordered: bool = False
) -> bool:
    """Execution match: the same rows (in order when `ordered`, else as a multiset), allowing the
    columns in another order (`SELECT COUNT(*), genre` answers "how many per genre" as well as
    `SELECT genre, COUNT(*)`); 1 and 1.0 are equal."""
    if len(got) != len(expected):
        return False
    got_rows = [tuple(_cell(v) for v in r) for r in got]
    want_rows = [tuple(_cell(v) for v in r) for r in expected]
    if not want_rows:
        return True
    width = len(want_rows[0])
    if any(len(r) != width for r in got_rows):
        return False

    def key(rows: list[tuple[object, ...]]) -> list[str]:
        return [repr(tuple(float(v) if isinstance(v, int) else v for v in r)) for r in rows]

    want = key(want_rows) if ordered else sorted(key(want_rows))
    for perm in itertools.permutations(range(width)) if width <= 4 else [tuple(range(width))]:
        permuted = key([tuple(r[i] for i in perm) for r in got_rows])
        if (permuted if ordered else sorted(permuted)) == want:
            return True
    return False
