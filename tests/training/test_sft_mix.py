"""SFT records with a system message, and rehearsal of an earlier task (`data.replay`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.models.paths import DEMO_MODEL_DIR
from expertmesh.models.tokenizer import Tokenizer
from expertmesh.training.config import SFTConfig, TrainingConfigError, parse_config
from expertmesh.training.data import EncodedChat, encode_chat
from expertmesh.training.sft import SFTTask, encode_sft_file
from expertmesh.training.tokenizer import END_OF_TURN


def _job(tmp: Path, **data: object) -> SFTConfig:
    raw = {
        "model": {"checkpoint": str(tmp)},
        "data": {"train": "t.jsonl", "val": "v.jsonl", "seq_len": 16, "batch_size": 8, **data},
        "run": {"name": "mix"},
        "output": {"dir": str(tmp / "out")},
    }
    return parse_config(raw, SFTConfig)


def test_a_system_field_is_rendered_before_the_prompt_as_serving_renders_it(tmp_path):
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    path = tmp_path / "sft.jsonl"
    path.write_text('{"system": "Answer in SQL.", "prompt": "How many?", "answer": "SELECT 1"}\n')
    (row,) = encode_sft_file(path, tok)
    served = tok.apply_chat_template(
        [{"role": "system", "content": "Answer in SQL."}, {"role": "user", "content": "How many?"}]
    )
    assert row.prompt == tok.encode(served, add_special_tokens=True)
    assert row == encode_chat(tok, "How many?", "SELECT 1", END_OF_TURN, "Answer in SQL.")
    assert row.prompt != encode_chat(tok, "How many?", "SELECT 1", END_OF_TURN).prompt


def test_a_non_string_system_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"system": 3, "prompt": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'system'"):
        encode_sft_file(path, Tokenizer.from_dir(DEMO_MODEL_DIR))


def test_replay_rows_make_up_the_configured_share_of_each_batch(tmp_path):
    job = _job(tmp_path, replay="r.jsonl", replay_fraction=0.25)
    new, old = EncodedChat([1, 2], [3, 4]), EncodedChat([5, 6], [7, 8])
    task = SFTTask(job, [new], [], 0, tmp_path, [old])
    rows = [task.batch(step, 0, 1)["ids"][:, 0] for step in range(200)]
    share = sum(int((r == 5).sum()) for r in rows) / (200 * 8)
    assert share == pytest.approx(0.25, abs=0.03)
    again = SFTTask(job, [new], [], 0, tmp_path, [old]).batch(7, 0, 1)["ids"]
    assert again.equal(task.batch(7, 0, 1)["ids"])  # a pure function of (seed, step, rank)


def test_without_replay_every_row_is_new_data(tmp_path):
    task = SFTTask(_job(tmp_path), [EncodedChat([1, 2], [3, 4])], [], 0, tmp_path, [])
    assert (task.batch(0, 0, 1)["ids"][:, 0] == 1).all()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replay_fraction": 0.3}, "needs a `replay` file"),
        ({"replay": "r.jsonl"}, "replay_fraction is 0"),
        ({"replay": "r.jsonl", "replay_fraction": 1.0}, "data.replay_fraction"),
    ],
)
def test_bad_replay_settings_name_the_field(tmp_path, data, message):
    with pytest.raises(TrainingConfigError, match=message):
        _job(tmp_path, **data)
