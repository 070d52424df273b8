"""The bundled text-to-SQL sample: a small Shakespeare database, template questions with their
SQL, and a rule-based baseline engine.

    python -m expertmesh.agents.sql_demo --build          # writes examples/sql/shakespeare.sqlite
    python -m expertmesh.agents.sql_demo --ask "How many characters are in Hamlet?"
    python -m expertmesh.agents.sql_demo --sft-data examples/training/data   # fine-tuning data

Provenance: every row is written by this file (no download). Titles, First Folio genre and
conventional approximate composition years of ten plays; principal characters as named in the
public-domain texts; and the act 1 scene headings (setting) of three plays as given in the
public-domain Globe edition. It is a small illustrative sample, not a complete catalogue.

`question_pairs()` generates question/SQL pairs from templates over that data, split by play
into train and held-out sets (the held-out set also has one phrasing no train template uses).
`finetune_pairs()` widens the train set for the demo model's fine-tune (more phrasings, and
titles of plays outside the database, so the model learns to copy a title, not to recall one)
and `write_sft_data` writes it in the SFT format with the service's exact prompts (built over
a training copy of the database that holds those titles, so their value hints are there).
`TemplateEngine` is the rule-based baseline: it answers a prompt by matching the question
against the train templates, behind the same `Engine` protocol as a model.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from expertmesh.serving.engine import (
    EngineHealth,
    EngineOutput,
    EngineRequest,
    ModelCard,
    UnknownModel,
)

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


def sample_rows() -> list[tuple[str, list[tuple[object, ...]]]]:
    """(INSERT statement with `%s` placeholders, rows) per table: the sample data for any
    database (SQLite swaps the placeholders for `?`)."""
    return [
        ("INSERT INTO plays VALUES (%s, %s, %s, %s)", list(PLAYS)),
        (
            "INSERT INTO characters (play_id, name) VALUES (%s, %s)",
            [(pid, name) for pid, names in CHARACTERS.items() for name in names],
        ),
        (
            "INSERT INTO scenes (play_id, act, scene, setting) VALUES (%s, 1, %s, %s)",
            [(pid, i + 1, s) for pid, settings in SCENES.items() for i, s in enumerate(settings)],
        ),
    ]


def build_sample_db(path: Path = SAMPLE_DB) -> Path:
    """Write the sample database at `path` (replacing it). Deterministic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        for insert, rows in sample_rows():
            conn.executemany(insert.replace("%s", "?"), rows)
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

# More phrasings of each train template's intent (same SQL), for fine-tuning only: a model that
# saw one wording per intent would learn the wording, not the intent.
PARAPHRASES: tuple[tuple[str, str], ...] = (
    ("How many characters does {title} have?", TRAIN_TEMPLATES[0][1]),
    ("Count the characters in {title}.", TRAIN_TEMPLATES[0][1]),
    ("Who are the characters in {title}?", TRAIN_TEMPLATES[1][1]),
    ("Which characters appear in {title}?", TRAIN_TEMPLATES[1][1]),
    ("When was {title} written?", TRAIN_TEMPLATES[2][1]),
    ("In which year was {title} written?", TRAIN_TEMPLATES[2][1]),
    ("What kind of play is {title}?", TRAIN_TEMPLATES[3][1]),
    ("Is {title} a comedy, a tragedy or a history?", TRAIN_TEMPLATES[3][1]),
    ("What plays are older than {title}?", TRAIN_TEMPLATES[4][1]),
    ("List the plays written earlier than {title}.", TRAIN_TEMPLATES[4][1]),
)

# Titles of other Shakespeare plays, absent from the database, used only to fine-tune: with
# the seven train plays alone a small model memorises titles instead of copying the one asked
# about. None is (or contains) a held-out title.
AUGMENT_TITLES: tuple[str, ...] = (
    "The Merchant of Venice",
    "As You Like It",
    "Julius Caesar",
    "Antony and Cleopatra",
    "Coriolanus",
    "Titus Andronicus",
    "Timon of Athens",
    "Troilus and Cressida",
    "Cymbeline",
    "The Winter's Tale",
    "Pericles",
    "Measure for Measure",
    "All's Well That Ends Well",
    "The Taming of the Shrew",
    "The Comedy of Errors",
    "Love's Labour's Lost",
    "The Two Gentlemen of Verona",
    "The Merry Wives of Windsor",
    "Richard II",
    "Henry IV",
    "Henry V",
    "Henry VI",
    "Henry VIII",
    "King John",
)


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


def _fill(templates: Sequence[tuple[str, str]], title: str) -> list[QuestionPair]:
    fill = {"title": title, "qtitle": _q(title)}
    return [QuestionPair(q.format(**fill), sql.format(**fill)) for q, sql in templates]


_NAMES = [
    "Antonio",
    "Portia",
    "Rosalind",
    "Orlando",
    "Brutus",
    "Cassius",
    "Cleopatra",
    "Antony",
    "Falstaff",
    "Imogen",
    "Perdita",
    "Leontes",
    "Hermione",
    "Isabella",
    "Angelo",
    "Petruchio",
    "Katherine",
    "Bianca",
    "Shylock",
    "Jessica",
    "Lorenzo",
    "Valentine",
    "Proteus",
    "Julia",
    "Silvia",
    "Timon",
    "Titus",
    "Lavinia",
    "Aaron",
    "Tamora",
    "Marina",
    "Posthumus",
    "Romeo",
    "Juliet",
    "Mercutio",
    "Tybalt",
    "Hamlet",
    "Ophelia",
    "Horatio",
    "Laertes",
    "Banquo",
    "Macduff",
    "Duncan",
    "Malcolm",
    "Goneril",
    "Regan",
    "Cordelia",
    "Edmund",
    "Edgar",
    "Puck",
    "Oberon",
    "Titania",
    "Bottom",
    "Hermia",
    "Helena",
    "Viola",
    "Olivia",
    "Malvolio",
    "Feste",
    "Beatrice",
    "Benedick",
    "Hero",
    "Claudio",
    "Dogberry",
]
_NOUNS = [
    "Storm",
    "Crown",
    "Dagger",
    "Rose",
    "Winter",
    "Summer",
    "Night",
    "Sword",
    "Mirror",
    "Garden",
    "Tower",
    "River",
    "Forest",
    "Ring",
    "Letter",
    "Masque",
    "Feast",
    "Shadow",
    "Ghost",
    "Island",
    "Castle",
    "Heath",
    "Moon",
    "Star",
    "Fool",
    "Merchant",
    "Widow",
    "Soldier",
    "Queen",
    "King",
    "Lovers",
    "Wager",
    "Exile",
    "Pilgrim",
    "Banquet",
    "Oath",
]
_PLACES = [
    "Verona",
    "Venice",
    "Padua",
    "Athens",
    "Rome",
    "Sicily",
    "Bohemia",
    "Vienna",
    "Navarre",
    "Illyria",
    "Messina",
    "Milan",
    "Windsor",
    "Ephesus",
    "Tyre",
    "Denmark",
    "Scotland",
    "Cyprus",
    "Arden",
    "Mantua",
]


def synthetic_titles(n: int = 300, seed: int = 0) -> list[str]:
    """`n` made-up play titles ("Portia and Brutus", "The Dagger of Padua", ...): many
    different titles make copying the asked-for title the only way to fit the data."""
    rng = random.Random(seed)
    forms = (
        lambda: rng.choice(_NAMES),
        lambda: f"{rng.choice(_NAMES)} and {rng.choice(_NAMES)}",
        lambda: f"The {rng.choice(_NOUNS)} of {rng.choice(_PLACES)}",
        lambda: f"The {rng.choice(_NOUNS)}",
        lambda: f"{rng.choice(_NAMES)} of {rng.choice(_PLACES)}",
        lambda: f"A {rng.choice(_NOUNS)} in {rng.choice(_PLACES)}",
    )
    held = [t.lower() for t in HELD_OUT_PLAYS]
    titles: dict[str, None] = {}
    while len(titles) < n:
        title = rng.choice(forms)()
        if not any(h in title.lower() for h in held):
            titles[title] = None
    return list(titles)


def finetune_pairs(synthetic: int = 300, per_synthetic: int = 3) -> list[QuestionPair]:
    """The fine-tuning set: every train template and paraphrase over the train plays and the
    other Shakespeare titles, plus `per_synthetic` random templates over each of `synthetic`
    made-up titles. No held-out play or held-out-only phrasing appears."""
    templates = TRAIN_TEMPLATES + PARAPHRASES
    titles = [t for _, t, _, _ in PLAYS if t not in HELD_OUT_PLAYS] + list(AUGMENT_TITLES)
    pairs = [p for t in titles for p in _fill(templates, t)]
    rng = random.Random(1)
    for title in synthetic_titles(synthetic):
        pairs += _fill(rng.sample(templates, per_synthetic), title)
    return pairs


def build_training_db(path: Path) -> Path:
    """The sample database plus every fine-tuning title outside it (as plays of unknown genre
    and year), so each fine-tuning prompt carries the value hints (`sql.link_values`) the
    service would give for its title. Used only to write the fine-tuning data."""
    build_sample_db(path)
    known = {title for _, title, _, _ in PLAYS}
    extra = [t for t in [*AUGMENT_TITLES, *synthetic_titles()] if t not in known]
    conn = sqlite3.connect(path)
    try:
        conn.executemany(
            "INSERT INTO plays (title, genre, year) VALUES (?, 'unknown', 0)",
            [(t,) for t in extra],
        )
        conn.commit()
    finally:
        conn.close()
    return path


def sft_records(pairs: Sequence[QuestionPair], db_path: Path = SAMPLE_DB) -> list[dict[str, str]]:
    """SFT records (`training/sft.py`) whose system and user messages are exactly what the
    text-to-SQL service sends for each question over `db_path` (schema and value linking)."""
    from .sql import prepare_prompt
    from .sql_guard import SQLiteDatabase

    db = SQLiteDatabase(db_path)
    records = []
    for pair in pairs:
        system, user = prepare_prompt(pair.question, db).messages
        records.append({"system": system.content, "prompt": user.content, "answer": pair.sql})
    return records


def write_sft_data(out_dir: Path, db_path: Path = SAMPLE_DB) -> tuple[Path, Path]:
    """`sql_train.jsonl` (fine-tuning pairs, prompts over `build_training_db`) and
    `sql_val.jsonl` (the held-out questions over `db_path`, for the validation perplexity the
    training run reports) under `out_dir`."""
    import json
    import tempfile

    out_dir.mkdir(parents=True, exist_ok=True)
    _, held = question_pairs()
    paths = out_dir / "sql_train.jsonl", out_dir / "sql_val.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        train_db = build_training_db(Path(tmp) / "train.sqlite")
        for path, pairs, db in zip(paths, (finetune_pairs(), held), (train_db, db_path)):
            lines = (json.dumps(r, ensure_ascii=False) for r in sft_records(pairs, db))
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


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

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        """A quarter of the characters, as `generate` reports (the templates have no tokenizer)."""
        text = request.messages[-1].content if request.messages else request.prompt or ""
        return len(text) // 4

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
    parser.add_argument(
        "--sft-data", type=Path, metavar="DIR", help="write sql_train/sql_val.jsonl for SFT"
    )
    args = parser.parse_args(argv)
    if args.build:
        print(f"wrote {build_sample_db(args.db)}")
    if args.sft_data:
        for path in write_sft_data(args.sft_data, args.db):
            print(f"wrote {path}")
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
