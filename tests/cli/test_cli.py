"""The `expertmesh` command line: generate and inspect, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.cli import main


def test_generate_with_demo_model_streams_text(capsys):
    assert main(["generate", "--model", "demo", "--max-tokens", "8", "--seed", "0", "ROMEO:"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:")
    assert len(out.strip()) > len("ROMEO:")
    assert "8 tokens" in err and "finish_reason=length" in err


def test_generate_is_deterministic_for_a_seed(capsys):
    args = [
        "generate",
        "--model",
        "demo",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--seed",
        "3",
        "A",
    ]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_generate_chat_applies_template(capsys):
    assert (
        main(
            ["generate", "--model", "demo", "--chat", "--max-tokens", "4", "--ignore-eos", "Hello"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "Hello" not in out  # with --chat only the reply is printed
    assert "4 tokens" in err


def test_generate_writes_spans_to_jsonl(tmp_path, capsys):
    spans = tmp_path / "spans.jsonl"
    assert (
        main(
            ["generate", "--model", "demo", "--max-tokens", "3", "--trace-jsonl", str(spans), "Hi"]
        )
        == 0
    )
    spans = [json.loads(line) for line in spans.read_text().splitlines()]
    names = [s["name"] for s in spans]
    assert "expertmesh.prefill" in names
    assert names.count("expertmesh.decode_step") == 2  # 3 tokens: 1 from prefill, 2 decode steps
    [root] = [s for s in spans if s["name"] == "expertmesh.generate"]
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}  # one request, one trace
    assert root["attributes"]["gen_ai.usage.output_tokens"] == 3


def test_inspect_reports_params_and_kv_reduction(capsys):
    assert main(["inspect", "demo"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3" in out
    assert "active parameters per token" in out
    assert (
        "latent" in out and "91.2%" in out
    )  # 56 latent values vs 640 for the MHA-equivalent cache


def _one_line_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    err = _one_line_error(["generate", "--model", str(tmp_path / "nope"), "hi"], capsys)
    assert "does not exist" in err


def test_malformed_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    err = _one_line_error(["inspect", str(tmp_path)], capsys)
    assert "config.json" in err and "not valid JSON" in err


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    err = _one_line_error(["inspect", str(tmp_path)], capsys)
    assert "llama" in err and "deepseek_v3" in err


def test_unsupported_option_is_one_line(tmp_path, capsys, hf_checkpoint):
    path, _ = hf_checkpoint("olmoe")
    capsys.readouterr()  # drop the fixture's own output
    err = _one_line_error(["generate", "--model", str(path), "--kv-cache", "latent", "hi"], capsys)
    assert "latent" in err and "'full' or 'int8'" in err


def test_bad_sampling_option_is_one_line(capsys):
    err = _one_line_error(["generate", "--model", "demo", "--top-p", "0", "hi"], capsys)
    assert "top_p" in err


@pytest.mark.slow
def test_console_script_runs_as_a_new_user_would():
    exe = Path(sys.executable).parent / "expertmesh"
    proc = subprocess.run(
        [exe, "generate", "--model", "demo", "--max-tokens", "4", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hi")
