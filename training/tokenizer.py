"""Train the demo model's tokenizer: a byte-level BPE (GPT-2 style) with chat special tokens.

Byte-level means every string encodes (no unknown token): the base vocabulary is the 256 bytes
and the merges are learnt from the corpus. Writes two files that `expertmesh.models.tokenizer`
(and Hugging Face `transformers`) load:

- `tokenizer.json`: the pipeline (ByteLevel pre-tokeniser and decoder, BPE, a post-processor
  that starts `encode(..., add_special_tokens=True)` with `<|endoftext|>`).
- `tokenizer_config.json`: `<|endoftext|>` as BOS, EOS and padding token, `<|end|>` (end of a
  chat turn) as an additional EOS, and `CHAT_TEMPLATE`.

Train on the Shakespeare plays (downloaded once into the cache; see `training/corpus.py`) and
write the bundled demo tokenizer:

    python -m expertmesh.training.tokenizer --vocab-size 4096 --out expertmesh/demo

or on your own text files with `--files a.txt b.txt`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .corpus import fetch_shakespeare, train_val_split

ENDOFTEXT = "<|endoftext|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = {"user": "<|user|>", "assistant": "<|assistant|>", "system": "<|system|>"}
SPECIAL_TOKENS = (
    ENDOFTEXT,
    ROLE_TOKENS["user"],
    ROLE_TOKENS["assistant"],
    ROLE_TOKENS["system"],
    END_OF_TURN,
)
"""Ids 0-4, in this order."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""`<|role|>\\ncontent<|end|>\\n` per message; `<|assistant|>\\n` opens the reply. The BOS comes
from encoding with `add_special_tokens=True`, so the template does not write it."""


def tokenizer_config(chat_template: str = CHAT_TEMPLATE) -> dict[str, Any]:
    """tokenizer_config.json for a tokenizer trained here."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "add_bos_token": True,
        # expertmesh extension (transformers ignores it): more tokens that end generation
        "additional_eos_tokens": [END_OF_TURN],
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def _texts(files: Sequence[Path]) -> Iterator[str]:
    # Whole files, read in text mode (universal newlines): merges may then span blank lines,
    # which is how verse and speaker headings are laid out.
    for path in files:
        yield Path(path).read_text(encoding="utf-8")


def train_bpe_tokenizer(
    files: Sequence[Path], vocab_size: int, out_dir: Path, show_progress: bool = True
) -> Path:
    """Train a byte-level BPE with `vocab_size` ids (special tokens and the 256 bytes included)
    on the UTF-8 text `files`; write tokenizer.json and tokenizer_config.json to `out_dir`.

    Returns `out_dir`. Warns when the corpus has too few distinct pairs to reach `vocab_size`
    (the vocabulary is then smaller).
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= minimum:
        raise ValueError(
            f"vocab_size must exceed {minimum} (special tokens + 256 bytes), got {vocab_size}"
        )
    if not files:
        raise ValueError("no training files given")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"training files not found: {', '.join(missing)}")

    if show_progress:
        megabytes = sum(Path(f).stat().st_size for f in files) / 1e6
        print(
            f"training a byte-level BPE of {vocab_size} tokens on {len(files)} files ({megabytes:.1f} MB)",
            file=sys.stderr,
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_texts(files), trainer=trainer, length=len(files))
    bos_id = tokenizer.token_to_id(ENDOFTEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{ENDOFTEXT} $A",
        pair=f"{ENDOFTEXT} $A {ENDOFTEXT} $B",
        special_tokens=[(ENDOFTEXT, bos_id)],
    )

    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    if trained < vocab_size:
        warnings.warn(
            f"the corpus supports only {trained} tokens (asked for {vocab_size}); add text or lower --vocab-size",
            stacklevel=2,
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    config_text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    return out_dir


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "expertmesh" / "shakespeare"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--out", type=Path, default=Path("expertmesh/demo"), help="directory to write into"
    )
    parser.add_argument(
        "--files", type=Path, nargs="+", help="train on these text files instead of Shakespeare"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="Shakespeare download cache"
    )
    args = parser.parse_args(argv)

    if args.files:
        files, held_out = list(args.files), list(args.files[:1])
    else:
        # Only the training plays: keep the validation plays unseen by every trained artefact.
        files, held_out = train_val_split(fetch_shakespeare(args.cache_dir))
        print(
            f"corpus: {len(files)} works for training, {len(held_out)} held out: {', '.join(p.stem for p in held_out)}"
        )
    out = train_bpe_tokenizer(files, args.vocab_size, args.out)

    from expertmesh.models.tokenizer import Tokenizer as ModelTokenizer

    tok = ModelTokenizer.from_dir(out)
    sample = "".join(Path(p).read_text(encoding="utf-8") for p in held_out)
    chars_per_token = len(sample) / max(1, len(tok.encode(sample)))
    size_kib = (out / "tokenizer.json").stat().st_size / 1024
    print(
        f"wrote {out / 'tokenizer.json'} ({size_kib:.0f} KiB) and {out / 'tokenizer_config.json'}"
    )
    print(
        f"vocab size {tok.vocab_size}; {chars_per_token:.2f} characters per token on {', '.join(Path(p).name for p in held_out)}"
    )


if __name__ == "__main__":
    main()
