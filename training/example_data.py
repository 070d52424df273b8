"""The example SFT and DPO datasets, generated from templates over the Shakespeare plays.

    python -m expertmesh.training.example_data --out examples/training/data

Speeches are parsed from the modern-spelling Gutenberg texts of the `shakespeare` package
(a speaker heading such as `ROMEO.` or `Kent.` on its own line, then the speech, then a blank
line). Training examples come from the training plays and validation examples from the held-out
plays of `corpus.train_val_split`, so no held-out play leaks into training. Fully
deterministic for a given seed.

SFT (`{"prompt", "answer", "template"}`), four templates:
- `name`: "ROMEO:" -> the first lines of one of Romeo's speeches (what `make run` asks);
- `speak`: "Speak as Romeo in Romeo and Juliet." -> lines of a speech by that speaker;
- `continue`: "Continue this passage:" + two lines -> the next two lines of the speech;
- `about`: "Give me a line about <word>." -> a line containing that word.

DPO (`{"prompt", "chosen", "rejected", "template"}`): "Give me a line about <word>." ->
chosen: a line containing the word; rejected: a line of similar length from the same play that
does not contain it. The preference (stay on the asked-for topic) is checkable by a person and
by a string match, and a model that only imitates Shakespeare does not hold it already.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .corpus import fetch_shakespeare, train_val_split
from .tokenizer import default_cache_dir

HEADING = re.compile(r"^([A-Z][A-Za-z' ]{1,30})\.$")
WORD = re.compile(r"[A-Za-z]+")
_STOPWORDS = (
    "about above after again against before being below between could every first from have "
    "having here hither into itself more most never other ought shall should some such than "
    "that their them then there these they this those thou thee thine thy through until upon "
    "very what when where which while whilst whom whose will with would your yours hath doth "
    "shalt wilt art unto within without therefore"
)
STOPWORDS = frozenset(_STOPWORDS.split())


@dataclass(frozen=True)
class Speech:
    play: str
    speaker: str
    lines: tuple[str, ...]


SMALL_WORDS = frozenset({"of", "and", "the", "in", "a", "or", "to"})


def play_title(text: str) -> str:
    """The play's first line, title-cased: 'THE LIFE OF KING HENRY V' -> 'The Life of King Henry V'."""
    first = next(line for line in text.splitlines() if line.strip()).strip()
    words = []
    for i, w in enumerate(first.split()):
        low = w.lower()
        if re.fullmatch(r"[ivx]+", low):
            words.append(w.upper())
        elif i and low in SMALL_WORDS:
            words.append(low)
        else:
            words.append(w.capitalize())
    return " ".join(words)


def parse_speeches(text: str) -> list[Speech]:
    """Speeches of one play: blocks that start with a speaker heading line."""
    title = play_title(text)
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        m = HEADING.match(lines[0])
        if not m:
            continue
        body = tuple(line for line in lines[1:] if line and not line.startswith("["))
        if body:
            speeches.append(Speech(title, m.group(1).strip(), body))
    return speeches


def topic_words(line: str) -> list[str]:
    return [w.lower() for w in WORD.findall(line) if len(w) >= 5 and w.lower() not in STOPWORDS]


def _display(speaker: str) -> str:
    return speaker.title() if speaker.isupper() else speaker


def sft_examples(speeches: Sequence[Speech], n: int, rng: random.Random) -> Iterator[dict]:
    long = [s for s in speeches if len(s.lines) >= 4]
    named = [s for s in speeches if len(s.speaker) >= 4]
    for i in range(n):
        kind = ("name", "speak", "continue", "about")[i % 4]
        if kind == "name":
            s = rng.choice(named)
            yield {
                "template": kind,
                "prompt": f"{s.speaker.upper()}:",
                "answer": "\n".join(s.lines[:4]),
            }
        elif kind == "speak":
            s = rng.choice(named)
            prompt = f"Speak as {_display(s.speaker)} in {s.play}."
            yield {"template": kind, "prompt": prompt, "answer": "\n".join(s.lines[:4])}
        elif kind == "continue":
            s = rng.choice(long)
            k = rng.randrange(0, len(s.lines) - 3)
            passage = "\n".join(s.lines[k : k + 2])
            yield {
                "template": kind,
                "prompt": f"Continue this passage:\n{passage}",
                "answer": "\n".join(s.lines[k + 2 : k + 4]),
            }
        else:
            line, word = _line_with_topic(speeches, rng)
            yield {"template": kind, "prompt": f"Give me a line about {word}.", "answer": line}


def _line_with_topic(speeches: Sequence[Speech], rng: random.Random) -> tuple[str, str]:
    while True:
        s = rng.choice(speeches)
        line = rng.choice(s.lines)
        words = topic_words(line)
        if words and len(line) >= 20:
            return line, rng.choice(words)


def dpo_pairs(speeches: Sequence[Speech], n: int, rng: random.Random) -> Iterator[dict]:
    by_play: dict[str, list[str]] = {}
    for s in speeches:
        by_play.setdefault(s.play, []).extend(line for line in s.lines if len(line) >= 20)
    made = 0
    while made < n:
        s = rng.choice(speeches)
        chosen = rng.choice(s.lines)
        words = topic_words(chosen)
        if not words or len(chosen) < 20:
            continue
        word = rng.choice(words)
        candidates = [
            line
            for line in rng.sample(by_play[s.play], min(200, len(by_play[s.play])))
            if abs(len(line) - len(chosen)) <= max(4, len(chosen) // 5)
            and word not in (w.lower() for w in WORD.findall(line))
        ]
        if not candidates:
            continue
        made += 1
        yield {
            "template": "about",
            "prompt": f"Give me a line about {word}.",
            "chosen": chosen,
            "rejected": rng.choice(candidates),
        }


def write_jsonl(path: Path, records: Iterator[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def build_datasets(
    out: Path,
    cache_dir: Path,
    seed: int = 0,
    sizes: tuple[int, int, int, int] = (2000, 200, 1200, 200),
) -> dict[str, int]:
    """Write sft_train/sft_val/dpo_train/dpo_val.jsonl; returns records per file."""
    train_files, val_files = train_val_split(fetch_shakespeare(cache_dir))

    def speeches(files: Sequence[Path]) -> list[Speech]:
        return [s for f in files for s in parse_speeches(f.read_text(encoding="utf-8"))]

    train, val = speeches(train_files), speeches(val_files)
    out.mkdir(parents=True, exist_ok=True)
    n_sft, n_sft_val, n_dpo, n_dpo_val = sizes
    return {
        "sft_train.jsonl": write_jsonl(out / "sft_train.jsonl", sft_examples(train, n_sft, random.Random(seed))),
        "sft_val.jsonl": write_jsonl(out / "sft_val.jsonl", sft_examples(val, n_sft_val, random.Random(seed + 1))),
        "dpo_train.jsonl": write_jsonl(out / "dpo_train.jsonl", dpo_pairs(train, n_dpo, random.Random(seed + 2))),
        "dpo_val.jsonl": write_jsonl(out / "dpo_val.jsonl", dpo_pairs(val, n_dpo_val, random.Random(seed + 3))),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("examples/training/data"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, n in build_datasets(args.out, args.cache_dir, args.seed).items():
        print(f"{args.out / name}: {n} records")


if __name__ == "__main__":
    main()
