"""Training the byte-level BPE on a tiny text, and the by-play corpus split (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmesh.models.tokenizer import Tokenizer
from expertmesh.training.corpus import train_val_split
from expertmesh.training.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_bpe_tokenizer

VERSE = """ROMEO.
But soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief.

JULIET.
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name.
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "verse.txt"
    corpus.write_text(VERSE * 20, encoding="utf-8")
    return train_bpe_tokenizer(
        [corpus], vocab_size=320, out_dir=tmp_path_factory.mktemp("tok"), show_progress=False
    )


def test_training_writes_tokenizer_and_config(trained: Path) -> None:
    assert sorted(p.name for p in trained.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((trained / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"
    assert config["chat_template"] == CHAT_TEMPLATE


def test_trained_vocab_has_requested_size(trained: Path) -> None:
    assert Tokenizer.from_dir(trained).vocab_size == 320


def test_special_tokens_take_the_first_ids(trained: Path) -> None:
    tok = Tokenizer.from_dir(trained)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_end_of_turn_and_endoftext_both_end_generation(trained: Path) -> None:
    tok = Tokenizer.from_dir(trained)
    assert tok.eos_token_ids == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")}


def test_unseen_characters_round_trip_through_the_byte_alphabet(trained: Path) -> None:
    tok = Tokenizer.from_dir(trained)
    text = "naïve café 日本語 🎭"
    assert tok.decode(tok.encode(text)) == text


def test_chat_prompt_is_special_tokens_around_the_message(trained: Path) -> None:
    tok = Tokenizer.from_dir(trained)
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Romeo"}]), add_special_tokens=True
    )
    names = ["<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>"]
    special = [i for i in ids if i < len(SPECIAL_TOKENS)]
    assert special == [tok.token_to_id(n) for n in names]


def test_vocab_smaller_than_specials_and_bytes_is_rejected(tmp_path: Path) -> None:
    corpus = tmp_path / "verse.txt"
    corpus.write_text(VERSE)
    with pytest.raises(ValueError, match="vocab_size must exceed 261"):
        train_bpe_tokenizer([corpus], vocab_size=261, out_dir=tmp_path / "tok", show_progress=False)


def test_corpus_too_small_for_vocab_warns(tmp_path: Path) -> None:
    corpus = tmp_path / "verse.txt"
    corpus.write_text("to be or not to be")
    with pytest.warns(UserWarning, match="supports only"):
        train_bpe_tokenizer(
            [corpus], vocab_size=4096, out_dir=tmp_path / "tok", show_progress=False
        )


def test_split_is_by_play_and_deterministic() -> None:
    plays = [Path(f"texts/play_{i:02d}_gut.txt") for i in range(42)]
    train, val = train_val_split(plays, val_fraction=0.05, seed=0)
    assert len(val) == 2
    assert sorted(train + val) == sorted(plays)
    assert (train, val) == train_val_split(list(reversed(plays)), val_fraction=0.05, seed=0)
    assert train_val_split(plays, seed=1)[1] != val


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_fraction_outside_zero_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split([Path("a"), Path("b")], val_fraction=fraction)
