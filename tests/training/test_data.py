"""Batches: deterministic by (seed, step, rank), chat rows carry loss on the answer only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.training.data import (
    IGNORE,
    DatasetError,
    EncodedChat,
    encode_chat,
    eval_windows,
    pack_rows,
    random_windows,
    read_jsonl,
    step_rng,
)
from expertmesh.training.tokenizer import END_OF_TURN

TOKENS = np.arange(1000, dtype=np.uint16)


def test_batches_depend_only_on_seed_step_and_rank():
    a = random_windows(TOKENS, 4, 16, step_rng(0, 7, 1))
    assert torch.equal(a, random_windows(TOKENS, 4, 16, step_rng(0, 7, 1)))
    assert not torch.equal(a, random_windows(TOKENS, 4, 16, step_rng(0, 7, 0)))
    assert not torch.equal(a, random_windows(TOKENS, 4, 16, step_rng(0, 8, 1)))
    assert a.shape == (4, 17) and bool((a[:, 1:] == a[:, :-1] + 1).all())  # contiguous text


def test_eval_windows_are_disjoint_and_spread_over_the_text():
    w = eval_windows(TOKENS, 10, 5)
    assert w.shape == (5, 11)
    starts = w[:, 0].tolist()
    assert starts[0] == 0 and starts[-1] >= 900 and sorted(set(starts)) == starts


def test_chat_rows_put_loss_on_the_answer_only():
    rows = [EncodedChat(prompt=[1, 2, 3], answer=[7, 8, 9])]
    ids, labels = pack_rows(rows, seq_len=8, pad_id=0)
    assert ids[0].tolist() == [1, 2, 3, 7, 8, 0, 0, 0]
    # position i predicts token i + 1: the answer starts after the last prompt token
    assert labels[0].tolist() == [IGNORE, IGNORE, 7, 8, 9, IGNORE, IGNORE, IGNORE]


def test_long_examples_keep_the_prompt_end_and_the_answer_start():
    rows = [EncodedChat(prompt=list(range(10, 30)), answer=[7, 8, 9])]
    ids, labels = pack_rows(rows, seq_len=6, pad_id=0)
    assert ids[0].tolist() == [26, 27, 28, 29, 7, 8]
    assert labels[0].tolist() == [IGNORE, IGNORE, IGNORE, 7, 8, 9]


def test_chat_encoding_matches_what_serving_sends_and_ends_the_turn():
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    enc = encode_chat(tok, "ROMEO:", "But soft!", END_OF_TURN)
    served = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "ROMEO:"}]), add_special_tokens=True
    )
    assert enc.prompt == served
    assert tok.token_to_id(END_OF_TURN) in enc.answer
    full = tok.apply_chat_template(
        [{"role": "user", "content": "ROMEO:"}, {"role": "assistant", "content": "But soft!"}],
        add_generation_prompt=False,
    )
    assert tok.decode(enc.prompt + enc.answer, skip_special_tokens=False).endswith(
        full.split("<|assistant|>\n", 1)[1]
    )


def test_dataset_record_without_a_field_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: field 'answer'"):
        read_jsonl(path, ("prompt", "answer"))
