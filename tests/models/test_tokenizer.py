"""Tokenizer loading, encode/decode, chat templates and streaming detokenization.

Each test builds its own tiny byte-level BPE with `tokenizers` (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from expertmesh.models.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
)

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CORPUS = [
    "ROMEO. But soft! what light through yonder window breaks?",
    "JULIET. O Romeo, Romeo! wherefore art thou Romeo?",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
] * 4
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MULTIBYTE = "naïve café 日本語 🎭"


def write_tokenizer(directory: Path, config: dict | None = None) -> Path:
    """A 320-token byte-level BPE trained on CORPUS, plus `config` as tokenizer_config.json."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def chat_config(**overrides) -> dict:
    config = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": True,
        "additional_eos_tokens": ["<|end|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    config.update(overrides)
    return config


@pytest.fixture
def tok(tmp_path: Path) -> Tokenizer:
    return Tokenizer.from_dir(write_tokenizer(tmp_path / "ckpt", chat_config()))


@pytest.fixture(scope="module")
def module_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("ckpt"), chat_config()))


@pytest.mark.parametrize("text", ["To be, or not to be", "Romeo!\n\n  Juliet?", MULTIBYTE, ""])
def test_encode_decode_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_encode_with_special_tokens_starts_with_one_bos(tok: Tokenizer) -> None:
    ids = tok.encode("To be", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == tok.encode("To be")


def test_text_starting_with_bos_does_not_get_a_second_one(tok: Tokenizer) -> None:
    ids = tok.encode("<|endoftext|>To be", add_special_tokens=True)
    assert ids == [tok.bos_token_id, *tok.encode("To be")]


def test_special_token_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == 320
    assert tok.bos_token_id == 0
    assert tok.pad_token_id == 0


def test_eos_ids_include_end_of_turn(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset(
        {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")}
    )


@pytest.mark.parametrize("eos_token_id", [7, [7, 9]])
def test_generation_config_eos_ids_are_added(tmp_path: Path, eos_token_id: int | list[int]) -> None:
    ckpt = write_tokenizer(tmp_path, chat_config(additional_eos_tokens=[]))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    expected = {0, *(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])}
    assert Tokenizer.from_dir(ckpt).eos_token_ids == expected


def test_added_token_dicts_are_accepted(tmp_path: Path) -> None:
    config = chat_config(bos_token={"content": "<|endoftext|>", "__type": "AddedToken"})
    assert Tokenizer.from_dir(write_tokenizer(tmp_path, config)).bos_token_id == 0


def test_without_tokenizer_config_no_bos_is_added(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path))
    assert tok.bos_token_id is None
    assert tok.eos_token_ids == frozenset()
    assert tok.encode("To be", add_special_tokens=True) == tok.encode("To be")


def test_chat_template_renders_roles_and_ends_with_assistant_prompt(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Speak in verse."},
        {"role": "user", "content": "Who art thou?"},
    ]
    text = tok.apply_chat_template(messages)
    assert (
        text
        == "<|system|>\nSpeak in verse.<|end|>\n<|user|>\nWho art thou?<|end|>\n<|assistant|>\n"
    )
    ids = tok.encode(text, add_special_tokens=True)
    assert ids[:2] == [tok.bos_token_id, tok.token_to_id("<|system|>")]
    assert ids[-2:] == [tok.token_to_id("<|assistant|>"), *tok.encode("\n")]


def test_chat_template_without_generation_prompt_ends_after_last_turn(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hail"}], add_generation_prompt=False
    )
    assert text == "<|user|>\nHail<|end|>\n"


def test_chat_template_raise_exception_is_a_chat_template_error(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "Enter ghost."}])


def test_message_without_content_is_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"role": "user"}])


def test_template_sees_bos_and_eos_tokens(tmp_path: Path) -> None:
    config = chat_config(chat_template="{{ bos_token }}|{{ eos_token }}")
    assert (
        Tokenizer.from_dir(write_tokenizer(tmp_path, config)).apply_chat_template([])
        == "<|endoftext|>|<|endoftext|>"
    )


def test_chat_template_jinja_file_wins_over_config(tmp_path: Path) -> None:
    ckpt = write_tokenizer(tmp_path, chat_config())
    (ckpt / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_dir(ckpt).apply_chat_template([]) == "from file"


def test_default_chat_template_when_none_configured(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path, chat_config(chat_template=None)))
    assert not tok.has_chat_template
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (
        tok.apply_chat_template([{"role": "user", "content": "Hail"}])
        == "<|user|>\nHail\n<|assistant|>\n"
    )


def test_template_that_does_not_compile_is_an_error_at_load(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer.from_dir(write_tokenizer(tmp_path, chat_config(chat_template="{% for %}")))


def test_missing_tokenizer_json_error_names_file_and_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_malformed_tokenizer_json_error_names_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json at .* is malformed"):
        Tokenizer.from_dir(tmp_path)


def test_special_token_missing_from_vocabulary_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="<s>"):
        Tokenizer.from_dir(write_tokenizer(tmp_path, chat_config(bos_token="<s>")))


def test_incremental_detokenizer_matches_full_decode_with_multibyte_characters(
    tok: Tokenizer,
) -> None:
    ids = tok.encode(f"ROMEO. {MULTIBYTE}")
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == detok.text == tok.decode(ids) == f"ROMEO. {MULTIBYTE}"
    assert "" in deltas  # some tokens hold only part of a character: their text is held back
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.pending


def test_incremental_detokenizer_flush_emits_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("🎭")
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.pending
    assert detok.flush() == "\ufffd"  # the bytes of a truncated character decode to one U+FFFD
    assert detok.text == "\ufffd"
    assert not detok.pending


def test_incremental_detokenizer_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|assistant|>\nHail<|end|>")
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) == "\nHail"


def test_incremental_detokenizer_context_ids_are_not_emitted(tok: Tokenizer) -> None:
    prompt, completion = tok.encode("To be,"), tok.encode(" or not to be")
    detok = IncrementalDetokenizer(tok, context_ids=prompt)
    assert "".join(detok.push(i) for i in completion) == " or not to be"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_incremental_detokenizer_equals_full_decode_for_any_text(
    module_tok: Tokenizer, text: str
) -> None:
    ids = module_tok.encode(text)
    # Any text may spell a special token ('<|system|>', found by hypothesis): decode keeps it,
    # so the stream is compared with special tokens kept too.
    detok = IncrementalDetokenizer(module_tok, skip_special_tokens=False)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == module_tok.decode(ids, skip_special_tokens=False) == text
