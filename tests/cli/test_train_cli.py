"""`expertmesh train`: config errors are one line naming the field; a job runs to its report."""

from __future__ import annotations

import json

import yaml

from expertmesh.cli import main


def test_invalid_config_is_one_line_naming_the_field(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "demo"},
                "optim": {"max_steps": 0},
                "run": {"name": "x"},
                "output": {"dir": "o"},
            }
        )
    )
    assert main(["train", "pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expertmesh train pretrain: error:")
    assert "optim.max_steps: Input should be greater than or equal to 1" in err


def test_missing_config_file_is_reported(tmp_path, capsys):
    assert main(["train", "sft", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quantize_job_runs_from_the_command_line(tmp_path, capsys):
    from expertmesh.models.checkpoint import save_model
    from expertmesh.models.paths import DEMO_MODEL_DIR
    from expertmesh.models.tokenizer import Tokenizer
    from expertmesh.training.config import ModelSection
    from expertmesh.training.model_init import fresh_config, start_model

    tiny = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "kv_lora_rank": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}  # fmt: skip
    section = ModelSection(preset="demo", config=tiny, tokenizer=str(DEMO_MODEL_DIR))
    model = start_model(section, fresh_config(section, Tokenizer.from_dir(DEMO_MODEL_DIR)))
    ckpt = save_model(model, tmp_path / "ckpt", tokenizer_from=DEMO_MODEL_DIR)
    corpus = tmp_path / "text.txt"
    corpus.write_text("But soft! what light through yonder window breaks?\n" * 40)
    config = tmp_path / "quantize.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(ckpt),
                "output": {"dir": str(tmp_path / "q")},
                "eval": {"files": [str(corpus)], "seq_len": 16, "val_windows": 2},
                "bench_batch_sizes": [1],
                "bench_new_tokens": 2,
                "bench_prompt_tokens": 4,
                "bench_repeats": 1,
            }
        )
    )
    code = main(["train", "quantize", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert 0 < report["int8_expert_bytes"] < report["float_expert_bytes"]
