"""Quantisation and expert pruning/merging jobs: every output is a checkpoint the model core
loads, with the sizes and perplexities the reports claim."""

from __future__ import annotations

import json

import pytest
import torch

from expertmesh.models.checkpoint import load_model
from expertmesh.models.router_stats import RouterStats
from expertmesh.training.config import PruneConfig, QuantizeConfig, parse_config
from expertmesh.training.prune import experts_to_keep, reduce_experts, run_prune
from expertmesh.training.quantize import run_quantize


def _eval(corpus_file) -> dict:
    return {"files": [str(corpus_file)], "seq_len": 32, "val_windows": 4}


def test_quantize_job_writes_an_int8_checkpoint_with_its_report(
    tmp_path, tiny_checkpoint, corpus_file
):
    cfg = parse_config(
        {"model": str(tiny_checkpoint), "output": {"dir": str(tmp_path / "q")},
         "eval": _eval(corpus_file), "bench_prompt_tokens": 8, "bench_new_tokens": 4,
         "bench_batch_sizes": [2], "bench_repeats": 1},
        QuantizeConfig,
    )  # fmt: skip
    out = run_quantize(cfg)
    # int8 weights + one fp32 scale per output row: a bit over a quarter of the fp32 bytes
    assert 0.25 < out.int8_expert_bytes / out.float_expert_bytes < 0.35
    assert out.int8_checkpoint_bytes < out.float_checkpoint_bytes
    assert abs(out.perplexity_change) < 0.01
    assert set(out.tokens_per_s["batch 2"]) == {"float", "int8"}
    model = load_model(out.output_dir)
    assert next(b.moe.experts for b in model.blocks if b.moe).quantized
    report = json.loads((out.output_dir / "quantize_report.json").read_text())
    assert report["int8_perplexity"] == pytest.approx(out.int8_perplexity)


def test_least_used_experts_are_removed_first():
    counts = torch.tensor([5, 0, 9, 1, 7, 3, 2, 8])
    assert experts_to_keep(counts, 3) == [0, 2, 4, 5, 7]  # experts 1, 6, 3 had fewest tokens
    assert experts_to_keep(counts, 0) == list(range(8))


def test_merging_folds_a_removed_expert_into_its_router_twin(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    layer = model.config.moe_layer_ids[0]
    moe = model.blocks[layer].moe
    with torch.no_grad():  # expert 7 routes like expert 2 and is unused: it merges into 2
        moe.router.weight[7] = moe.router.weight[2] * 2
    stats = RouterStats(model.config)
    stats.tokens[layer] = torch.tensor([5, 5, 5, 5, 5, 5, 5, 0])
    merged = reduce_experts(model, stats, 1, "merge")
    pruned = reduce_experts(model, stats, 1, "prune")
    bank, w = merged.blocks[layer].moe.experts, moe.experts
    expected = (w.gate_up[2] * 6 + w.gate_up[7] * 1) / 7  # usage + 1 weighting
    torch.testing.assert_close(bank.gate_up[2], expected)
    torch.testing.assert_close(pruned.blocks[layer].moe.experts.gate_up[2], w.gate_up[2])
    assert merged.config.moe.num_experts == 7 and merged.config.moe.n_group == 1


def test_prune_job_writes_checkpoints_a_curve_and_a_table(tmp_path, tiny_checkpoint, corpus_file):
    cfg = parse_config(
        {"model": str(tiny_checkpoint), "output": {"dir": str(tmp_path / "p")},
         "eval": _eval(corpus_file), "calibration_tokens": 256, "experts_removed": [0, 2, 6]},
        PruneConfig,
    )  # fmt: skip
    out = run_prune(cfg)
    assert out.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = out.table.read_text().splitlines()
    assert len(rows) == 2 + 3 and rows[-1].startswith("| 6 | 2 |")
    by = {(p.method, p.experts_removed): p for p in out.points}
    assert by[("prune", 0)].perplexity == pytest.approx(out.baseline_perplexity)
    for (method, removed), point in by.items():
        model = load_model(point.checkpoint)
        assert model.config.moe.num_experts == 8 - removed
        assert point.expert_bytes == by[(method, 0)].expert_bytes * (8 - removed) // 8
