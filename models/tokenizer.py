"""Text <-> token ids for a checkpoint directory, chat templates, and streaming detokenization.

A checkpoint directory holds the Hugging Face tokenizer files:

- `tokenizer.json` (required): the `tokenizers` pipeline (normaliser, pre-tokeniser, model,
  post-processor, decoder).
- `tokenizer_config.json` (optional): `bos_token`, `eos_token`, `pad_token` (strings or
  `AddedToken` dicts), `add_bos_token`, `chat_template` (a string, or a list of
  `{"name", "template"}` of which we use `"default"`), and `additional_eos_tokens`, an
  expertmesh extension that Hugging Face ignores: more tokens that end generation (our demo
  tokenizer puts `<|end|>` there, the end of a chat turn).
- `chat_template.jinja` (optional): the newer place for the chat template; wins over the one in
  `tokenizer_config.json`, as in transformers.
- `special_tokens_map.json` (optional): read for the special tokens that
  `tokenizer_config.json` does not name.
- `generation_config.json` (optional): its `eos_token_id` (an int or a list) adds stop tokens.

Chat templates are rendered the way transformers renders them (a sandboxed, immutable jinja2
environment with `trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`), so the
templates shipped with real checkpoints work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Used when a checkpoint configures no chat template: each message becomes
`<|role|>\\ncontent\\n`, and the generation prompt is `<|assistant|>\\n`. The role markers are
plain text unless the vocabulary happens to hold them as tokens."""


class TokenizerError(ModelError):
    """The tokenizer files of a checkpoint are missing, malformed or inconsistent."""


class ChatTemplateError(TokenizerError):
    """The chat template failed to compile or render (including its own `raise_exception`)."""


def _raise_exception(message: str) -> NoReturn:
    """Exposed to templates as `raise_exception(...)`, as transformers does."""
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    """Exposed to templates as `strftime_now(...)` (Llama 3 templates print today's date)."""
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str, origin: str) -> Any:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template from {origin} does not compile: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path.name} at {path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(
            f"{path.name} at {path} must hold a JSON object, not {type(data).__name__}"
        )
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token {value!r} is neither a string nor an AddedToken object")


def _chat_template_source(config: dict[str, Any], directory: Path) -> tuple[str, str] | None:
    """(template source, where it came from), or None when the checkpoint configures none."""
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    template = config.get("chat_template")
    origin = str(directory / TOKENIZER_CONFIG_FILE)
    if template is None:
        return None
    if isinstance(template, str):
        return template, origin
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default, f"{origin} (template 'default')"
    raise TokenizerError(
        f"chat_template in {origin} must be a string or a list with a 'default' entry"
    )


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template, special token ids.

    Build it with `Tokenizer.from_dir(checkpoint_dir)`; the constructor takes parsed parts so tests
    and tools can assemble one without files.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        pad_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        chat_template_origin: str = "<argument>",
    ) -> None:
        """`eos_tokens` are token strings, `eos_token_ids` raw ids (from generation_config.json);
        both end generation. `add_bos_token`: `encode(..., add_special_tokens=True)` starts with
        the BOS token (unless the post-processor already put it there)."""
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.pad_token = pad_token
        self.add_bos_token = add_bos_token and bos_token is not None
        self._bos_token_id = self._id_of(bos_token, "bos_token")
        self._pad_token_id = self._id_of(pad_token, "pad_token")
        ids = {self._required_id(t, "eos token") for t in eos_tokens}
        vocab_size = self.vocab_size
        for i in eos_token_ids:
            if not 0 <= i < vocab_size:
                raise TokenizerError(
                    f"eos_token_id {i} is outside the vocabulary (size {vocab_size})"
                )
            ids.add(i)
        self._eos_token_ids = frozenset(ids)
        self.has_chat_template = chat_template is not None
        """False when the checkpoint configures none and `DEFAULT_CHAT_TEMPLATE` is used."""
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        origin = chat_template_origin if chat_template is not None else "DEFAULT_CHAT_TEMPLATE"
        self._chat_template = _compile_chat_template(self.chat_template, origin)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer files of the checkpoint directory `path` (see the module docstring).

        Raises `TokenizerError` naming the file and path when `tokenizer.json` is missing or
        malformed, or when a configured special token is not in the vocabulary.
        """
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{TOKENIZER_FILE} is missing: no file at {tokenizer_file}")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for parse errors
            raise TokenizerError(f"{TOKENIZER_FILE} at {tokenizer_file} is malformed: {e}") from e

        config: dict[str, Any] = {}
        special_map = directory / SPECIAL_TOKENS_MAP_FILE
        if special_map.is_file():
            config.update(_read_json(special_map))
        config_file = directory / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            config.update(_read_json(config_file))
        generation_ids: list[int] = []
        generation_file = directory / GENERATION_CONFIG_FILE
        if generation_file.is_file():
            eos = _read_json(generation_file).get("eos_token_id")
            eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
            if not all(isinstance(i, int) for i in eos_list):
                raise TokenizerError(
                    f"eos_token_id in {generation_file} must be an int or a list of ints"
                )
            generation_ids = eos_list

        eos_tokens = [_token_content(config.get("eos_token"))]
        extra = config.get("additional_eos_tokens", [])
        if not isinstance(extra, list):
            raise TokenizerError(
                f"additional_eos_tokens in {config_file} must be a list of token strings"
            )
        eos_tokens += [_token_content(t) for t in extra]
        template = _chat_template_source(config, directory)
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_tokens=[t for t in eos_tokens if t is not None],
            eos_token_ids=generation_ids,
            pad_token=_token_content(config.get("pad_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template[0] if template else None,
            chat_template_origin=template[1] if template else "<none>",
        )

    # -- special tokens ------------------------------------------------------------------------

    def _id_of(self, token: str | None, field: str) -> int | None:
        return None if token is None else self._required_id(token, field)

    def _required_id(self, token: str, field: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{field} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation (eos_token, additional_eos_tokens, generation_config)."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -- text <-> ids --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings inside `text` (as chat templates write them)
        become their ids. With `add_special_tokens`, tokenizer.json's post-processor runs, the
        ids start with a BOS if `add_bos_token` is configured, and a text that already starts
        with the BOS token (a rendered chat template) does not get a second one."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self._bos_token_id
        if not add_special_tokens or bos is None:
            return ids
        if self.add_bos_token and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        elif ids[:2] == [bos, bos] and self.bos_token and text.startswith(self.bos_token):
            del ids[0]  # the post-processor added a BOS in front of the one the text starts with
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation (`[{"role": "user", "content": "..."}, ...]`) to prompt text.

        Uses the checkpoint's template, or `DEFAULT_CHAT_TEMPLATE` when it configures none
        (see `has_chat_template`): `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`
        when `add_generation_prompt`. Templates see `messages`, `add_generation_prompt`,
        `bos_token` and `eos_token` (empty strings when unset), and `raise_exception`.
        Encode the result with `encode(text, add_special_tokens=True)`: BOS is added there, and
        not twice if the template already wrote it.
        """
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise ChatTemplateError(
                    f"messages[{i}] needs string 'role' and 'content', got {message!r}"
                )
        try:
            return str(
                self._chat_template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                )
            )
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas.

    Decoding one token at a time is wrong for byte-level BPE (a token may hold half of a UTF-8
    character) and for SentencePiece (a token's leading space depends on its neighbour). So, as
    vLLM does, we decode a short window twice, `ids[prefix:read]` and `ids[prefix:]`, and emit
    the difference; text that ends in U+FFFD (an incomplete character) is held back until the
    next token completes it. The concatenation of the deltas equals `decode(all ids)`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        context_ids: Sequence[int] = (),
    ) -> None:
        """`context_ids`: the last few prompt ids, decoded as left context but never emitted, so
        the first generated token keeps the leading space a SentencePiece decoder would strip."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(context_ids[-5:])
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._ids)  # end of the ids whose text has been emitted
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every delta `push` returned)."""
        return self._text

    @property
    def pending(self) -> bool:
        """True while some pushed tokens have not yet produced text (an incomplete character)."""
        return self._read_offset < len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD); call at the end."""
        if not self.pending:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        delta = self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta
