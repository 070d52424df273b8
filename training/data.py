"""Training data: token streams for language modelling, chat examples for SFT, pairs for DPO.

The driver prepares everything as numpy arrays (tokenising once, cached on disk) and hands
them to the Ray Train workers inside the train-loop config, so a worker on another node needs
no access to the driver's files. Batches are a pure function of (seed, step, rank): a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expertmesh.models.tokenizer import Tokenizer

from .corpus import fetch_shakespeare, train_val_split
from .tokenizer import ENDOFTEXT, default_cache_dir

IGNORE = -100
"""Label of positions that carry no loss (prompt tokens, padding)."""


class DatasetError(ValueError):
    """A dataset file is missing or a record lacks a field (named with file and line)."""


# ----------------------------------------------------------------------------- corpus


def corpus_files(
    corpus: str | None, files: Sequence[str] | None, cache_dir: str | None, val_fraction: float
) -> tuple[list[Path], list[Path]]:
    """(train, validation) text files: the Shakespeare plays split by play, or given files."""
    if files:
        paths = [Path(f) for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"data.files not found: {', '.join(missing)}")
        if len(paths) == 1:  # one file: hold out its tail
            return paths, paths
        return train_val_split(paths, val_fraction)
    if corpus != "shakespeare":
        raise DatasetError(f"unknown corpus {corpus!r}; use 'shakespeare' or data.files")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return train_val_split(fetch_shakespeare(cache), val_fraction)


def encode_files(
    paths: Sequence[Path], tokenizer: Tokenizer, tokenizer_dir: Path, cache_dir: Path | None
) -> np.ndarray:
    """Token ids of the files, each preceded by <|endoftext|> (uint16 when the vocab fits).

    Cached under `cache_dir` keyed by the tokenizer file and the texts' names and sizes.
    """
    key = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes())
    for p in paths:
        key.update(f"{Path(p).name}:{Path(p).stat().st_size};".encode())
    cached = cache_dir / f"tokens-{key.hexdigest()[:16]}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    if eot is None:
        raise DatasetError(f"tokenizer in {tokenizer_dir} has no {ENDOFTEXT} token")
    ids: list[int] = []
    for p in paths:
        ids.append(eot)
        ids.extend(tokenizer.encode(Path(p).read_text(encoding="utf-8")))
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    arr = np.asarray(ids, dtype=dtype)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(cached)
    return arr


def split_single_file(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """The random source of one worker's batch at one step (stateless, so resumable)."""
    return np.random.default_rng([seed, step, rank])


def random_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> torch.Tensor:
    """(batch_size, seq_len + 1) random windows of the stream: inputs are [:, :-1], targets [:, 1:]."""
    if len(tokens) < seq_len + 2:
        raise DatasetError(f"the corpus has {len(tokens)} tokens; seq_len {seq_len} needs more")
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return torch.from_numpy(
        np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    )


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` consecutive, non-overlapping (seq_len + 1)-token windows, spread
    evenly over the stream so every held-out play contributes."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DatasetError(
            f"validation text has {len(tokens)} tokens; seq_len {seq_len} needs more"
        )
    picks = np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(int)
    return torch.from_numpy(
        np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in picks]).astype(np.int64)
    )


# ----------------------------------------------------------------------------- chat data


def read_jsonl(
    path: str | Path, fields: Sequence[str], optional: Sequence[str] = ()
) -> list[dict[str, str]]:
    """Records of a JSON-lines file, each required to hold string `fields` (and `optional`
    ones, when present, must be strings too)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e})") from e
        for f in fields:
            if not isinstance(record.get(f), str):
                raise DatasetError(f"{path}:{n}: field '{f}' must be a string")
        for f in optional:
            if f in record and not isinstance(record[f], str):
                raise DatasetError(f"{path}:{n}: field '{f}', when given, must be a string")
        records.append(record)
    if not records:
        raise DatasetError(f"{path} holds no records")
    return records


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of `prompt` rendered with the chat template, then of the answer + <|end|>."""

    prompt: list[int]
    answer: list[int]


def encode_chat(
    tokenizer: Tokenizer, prompt: str, answer: str, end_of_turn: str, system: str | None = None
) -> EncodedChat:
    """The prompt as the serving path renders it (template + BOS; a system message first when
    given) and the answer the model must learn, closed by the end-of-turn token and newline
    exactly as the template writes a turn."""
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return EncodedChat(
        tokenizer.encode(text, add_special_tokens=True),
        tokenizer.encode(answer + end_of_turn + "\n"),
    )


def pack_rows(
    rows: Sequence[EncodedChat], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, seq_len), labels (B, seq_len)): one example per row, right-padded;
    labels are the next token on answer positions and IGNORE elsewhere. An example longer than
    seq_len + 1 tokens keeps the end of its prompt and the start of its answer."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        answer = row.answer[:seq_len]
        prompt = row.prompt[-max(1, seq_len + 1 - len(answer)) :]
        seq = prompt + answer
        targets = [IGNORE] * len(prompt) + answer
        n = len(seq) - 1  # <= seq_len
        ids[r, :n] = torch.tensor(seq[:-1])
        labels[r, :n] = torch.tensor(targets[1:])
    return ids, labels
