"""Batched generation: batching and chunking invariance, seeded sampling, stopping, streaming,
request validation, long-prompt memory, and router statistics."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models
from tokenizers.pre_tokenizers import ByteLevel

from expertmesh.models.adapters.olmoe import ADAPTER as OLMOE_ADAPTER
from expertmesh.models.checkpoint import load_model
from expertmesh.models.errors import GenerationError
from expertmesh.models.generate import (
    Generator,
    SamplingParams,
    StreamEvent,
    _filter_top_k_top_p,
)
from expertmesh.models.model import MoEModel, init_random
from expertmesh.models.router_stats import RouterStats
from expertmesh.models.tokenizer import Tokenizer

PROMPTS = [
    [5, 17, 33, 2, 90, 41, 7, 8],
    [100, 3, 250],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 12, 13, 14, 15],
    [77, 66],
]
SAMPLED = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: decoding is thousands of small ops, where intra-op threads only
    add synchronisation (on a busy 2-core host, 4x the run time). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint_model(hf_checkpoint):
    """checkpoint_model(family) -> our model loaded from the tiny transformers checkpoint."""
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = load_model(hf_checkpoint(family)[0])
        return loaded[family]

    return get


def _olmoe_config(**overrides):
    raw = {
        "model_type": "olmoe",
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        **overrides,
    }
    return OLMOE_ADAPTER.parse_config(raw)


@pytest.fixture(scope="module")
def flat_model():
    """Random weights with a small std: next-token distributions are nearly flat, so sampling
    with different seeds almost surely diverges."""
    return init_random(MoEModel(_olmoe_config()), seed=0, std=0.02).eval()


def _texts(completions):
    return [c.token_ids for c in completions]


# ----------------------------------------------------------------------------- batching invariance


@pytest.mark.parametrize("family", ["deepseek_v3", "olmoe"])
def test_batched_greedy_generation_equals_each_prompt_alone(family, checkpoint_model):
    gen = Generator(checkpoint_model(family))
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    batched = gen.generate(PROMPTS, params)
    alone = [gen.generate([p], params)[0] for p in PROMPTS]
    assert _texts(batched) == _texts(alone)


@pytest.mark.parametrize("family", ["deepseek_v3", "olmoe"])
def test_chunked_prefill_gives_the_same_tokens_as_one_chunk(family, checkpoint_model):
    model = checkpoint_model(family)
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    chunked = Generator(model, prefill_chunk=3).generate(PROMPTS, params)
    whole = Generator(model, prefill_chunk=512).generate(PROMPTS, params)
    assert _texts(chunked) == _texts(whole)


def test_seeded_sample_is_the_same_alone_and_inside_a_batch(flat_model):
    gen = Generator(flat_model)
    alone = gen.generate([PROMPTS[0]], SAMPLED)[0]

    others = [
        SamplingParams(max_tokens=5, ignore_eos=True),
        SAMPLED,
        dataclasses.replace(SAMPLED, seed=3, max_tokens=20),
        dataclasses.replace(SAMPLED, seed=None),
    ]
    batch = gen.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[3]], others)
    assert batch[1].token_ids == alone.token_ids
    assert len(alone.token_ids) == SAMPLED.max_tokens


def test_different_seeds_give_different_samples(flat_model):
    gen = Generator(flat_model)
    outputs = [
        tuple(gen.generate([PROMPTS[0]], dataclasses.replace(SAMPLED, seed=s))[0].token_ids)
        for s in (1, 2, 3, 4)
    ]
    assert len(set(outputs)) > 1


def test_top_k_1_at_temperature_1_equals_greedy(flat_model):
    gen = Generator(flat_model)
    greedy = gen.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))
    top1 = gen.generate(
        PROMPTS, SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=5, ignore_eos=True)
    )
    assert _texts(top1) == _texts(greedy)


# ----------------------------------------------------------------------------- top-k / top-p

# probabilities 0.05, 0.5, 0.1, 0.2, 0.15 (token 1 most likely, then 3, 4, 2, 0)
LOGITS = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15]).log()


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    assert _kept(_filter_top_k_top_p(LOGITS, 2, 1.0)) == {1, 3}
    assert _kept(_filter_top_k_top_p(LOGITS, 4, 1.0)) == {1, 3, 4, 2}


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    assert _kept(_filter_top_k_top_p(LOGITS, 0, 0.45)) == {1}  # 0.5 >= 0.45
    assert _kept(_filter_top_k_top_p(LOGITS, 0, 0.6)) == {1, 3}  # 0.7 >= 0.6
    assert _kept(_filter_top_k_top_p(LOGITS, 0, 0.8)) == {1, 3, 4}  # 0.7 < 0.8 <= 0.85
    assert _kept(_filter_top_k_top_p(LOGITS, 0, 0.99)) == {0, 1, 2, 3, 4}


def test_top_p_applies_to_the_renormalised_top_k_distribution():
    # after top-3 the probabilities are 0.5/0.85, 0.2/0.85, 0.15/0.85: the first two reach 0.8
    assert _kept(_filter_top_k_top_p(LOGITS, 3, 0.8)) == {1, 3}


def test_filtering_keeps_the_logits_it_does_not_drop():
    out = _filter_top_k_top_p(LOGITS, 3, 0.8)
    assert torch.equal(out[[1, 3]], LOGITS[[1, 3]])


# ----------------------------------------------------------------------------- stopping


def test_max_tokens_is_honoured_with_finish_reason_length(checkpoint_model):
    gen = Generator(checkpoint_model("deepseek_v3"))
    out = gen.generate(PROMPTS, SamplingParams(max_tokens=7, ignore_eos=True))
    assert [len(c.token_ids) for c in out] == [7] * len(PROMPTS)
    assert {c.finish_reason for c in out} == {"length"}


def _first_new_token_at(tokens: list[int], at_least: int) -> tuple[int, int]:
    """(index, token) of the first token at index >= at_least not seen earlier in `tokens`."""
    for i in range(at_least, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i, tokens[i]
    raise AssertionError(f"greedy output {tokens} repeats itself; pick another prompt")


def test_stop_token_id_ends_generation_without_the_token(flat_model):
    gen = Generator(flat_model)
    free = gen.generate([PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    i, stop = _first_new_token_at(free, 3)

    out = gen.generate([PROMPTS[0]], SamplingParams(max_tokens=20, stop_token_ids=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[:i]
    assert stop not in out.token_ids


def test_eos_token_of_the_model_ends_generation_unless_ignored(hf_checkpoint):
    model = load_model(hf_checkpoint("olmoe")[0])
    free = Generator(model).generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True))[
        0
    ]
    i, eos = _first_new_token_at(free.token_ids, 2)
    model.config = dataclasses.replace(model.config, eos_token_ids=(eos,))
    gen = Generator(model)

    stopped = gen.generate([PROMPTS[1]], SamplingParams(max_tokens=20))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:i]
    ignored = gen.generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids


# ----------------------------------------------------------------------------- stop strings


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@pytest.fixture(scope="module")
def text_generator(tmp_path_factory):
    """A Generator with a tiny byte-level BPE tokenizer over printable ASCII (so every token
    decodes to whole characters) and a flat random model of the same vocabulary."""
    byte_char = _byte_level_alphabet()
    vocab = {byte_char[b]: i for i, b in enumerate(range(32, 127))}
    space = byte_char[ord(" ")]
    merges = [("t", "h"), ("th", "e"), (space, "a"), ("i", "n"), ("e", "r"), (space, "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    path = tmp_path_factory.mktemp("tokenizer")
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tokenizer = Tokenizer.from_dir(path)

    config = _olmoe_config(vocab_size=tokenizer.vocab_size)
    model = init_random(MoEModel(config), seed=0, std=0.02).eval()
    return Generator(model, tokenizer)


PROMPT_TEXT = "the cat in the hat"


def _free_text(gen: Generator, max_tokens: int = 30) -> tuple[str, list[str]]:
    out = gen.generate([PROMPT_TEXT], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
    assert gen.tokenizer is not None
    pieces = [gen.tokenizer.decode([t]) for t in out.token_ids]
    assert "".join(pieces) == out.text
    return out.text or "", pieces


def _stop_across_tokens(text: str, pieces: list[str]) -> str:
    """A 2-character stop string made of the end of one token and the start of the next,
    occurring first exactly there (so it is completed by a token, not found in one)."""
    boundary = 0
    for left, right in itertools.pairwise(pieces):
        boundary += len(left)
        if boundary < 4 or not left or not right:
            continue
        stop = left[-1] + right[0]
        if text.find(stop) == boundary - 1:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


def _stream(gen: Generator, params: SamplingParams):
    events: list[StreamEvent] = []
    out = gen.generate([PROMPT_TEXT], params, on_token=events.append)[0]
    return out, events


def test_stop_string_truncates_the_text_before_it(text_generator):
    text, pieces = _free_text(text_generator)
    stop = _stop_across_tokens(text, pieces)

    out = text_generator.generate(
        [PROMPT_TEXT], SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert out.text  # the stop string is not at the very start


def test_streamed_text_concatenates_to_the_final_text_without_the_stop_string(text_generator):
    text, pieces = _free_text(text_generator)
    stop = _stop_across_tokens(text, pieces)

    out, events = _stream(
        text_generator, SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True)
    )
    assert "".join(e.text for e in events) == out.text == text[: text.find(stop)]
    assert not any(stop in e.text for e in events)
    assert all(e.index == 0 for e in events)
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "stop"


def test_stream_holds_back_a_partial_stop_string_and_releases_it_at_the_end(text_generator):
    text, _ = _free_text(text_generator, max_tokens=20)
    first = text[len(text) // 2]
    stop = first + "\u00e9"  # é never decodes from this ASCII vocabulary: never completed

    out, events = _stream(
        text_generator, SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True)
    )
    assert out.finish_reason == "length"
    assert out.text == text
    assert "".join(e.text for e in events) == text
    assert events[-1].finish_reason == "length"
    streamed = ""
    for e in events[:-1]:
        streamed += e.text
        assert not streamed.endswith(first)  # held back while it could start the stop string


def test_stream_events_carry_the_token_ids_in_order(text_generator):
    out, events = _stream(text_generator, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [e.token_id for e in events] == out.token_ids
    assert events[-1].finish_reason == "length"


# ----------------------------------------------------------------------------- request validation


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value})


def test_prompt_plus_max_tokens_over_the_context_window_names_the_limit(checkpoint_model):
    model = checkpoint_model("olmoe")
    limit = model.config.max_position
    gen = Generator(model)
    with pytest.raises(GenerationError, match=str(limit)):
        gen.generate([[1] * (limit - 10)], SamplingParams(max_tokens=11))
    gen.generate([[1] * (limit - 10)], SamplingParams(max_tokens=1))  # just inside: accepted


@pytest.mark.parametrize("bad", [256, -1])
def test_token_ids_outside_the_vocabulary_are_rejected(bad, checkpoint_model):
    gen = Generator(checkpoint_model("olmoe"))  # vocabulary of 256
    with pytest.raises(GenerationError, match="vocabulary"):
        gen.generate([[5, bad, 7]], SamplingParams(max_tokens=2))


# ----------------------------------------------------------------------------- long prompts

LONG_PROMPT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from expertmesh.models.adapters.olmoe import ADAPTER
    from expertmesh.models.generate import Generator, SamplingParams
    from expertmesh.models.model import MoEModel, init_random

    torch.set_num_threads(1)  # this measures memory; one thread keeps it quick on a busy host
    tokens, heads = int(sys.argv[1]), int(sys.argv[2])
    config = ADAPTER.parse_config(dict(
        model_type="olmoe", vocab_size=128, hidden_size=32, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=heads, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=17000,
    ))
    model = init_random(MoEModel(config)).eval()
    prompt = torch.randint(0, 128, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    out = Generator(model, prefill_chunk=512).generate(
        [prompt], SamplingParams(max_tokens=2, ignore_eos=True)
    )[0]
    # VmHWM is this process's own peak: ru_maxrss would carry the parent's (pytest's) peak
    # across the vfork + exec that started this interpreter.
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024  # kB
    print(json.dumps({"generated": len(out.token_ids), "peak_rss_bytes": peak}))
    """
)


def test_16k_token_prompt_prefills_in_bounded_memory():
    tokens, heads = 16384, 2
    run = subprocess.run(
        [sys.executable, "-c", LONG_PROMPT_SCRIPT, str(tokens), str(heads)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])

    full_attention_bytes = tokens * tokens * heads * 4  # fp32 scores of one layer, all heads
    limit = int(1.5 * 1024**3)
    assert report["generated"] == 2
    assert report["peak_rss_bytes"] < limit < full_attention_bytes, (
        f"peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB; limit {limit / 1e9:.2f} GB; "
        f"the full {tokens}x{tokens}x{heads}-head fp32 attention matrix alone is "
        f"{full_attention_bytes / 1e9:.2f} GB"
    )


# ----------------------------------------------------------------------------- router statistics


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_router_stats_count_top_k_assignments_per_token_in_moe_layers_only(
    family, checkpoint_model
):
    model = checkpoint_model(family)
    config = model.config
    stats = RouterStats(config)
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, router_stats=stats)

    per_layer = stats.tokens.sum(dim=1).tolist()
    dense = [i for i, is_moe in enumerate(config.moe_layers) if not is_moe]
    assert dense  # both fixtures have a dense layer (deepseek: first, qwen2: mlp_only_layers)
    for layer in range(config.num_layers):
        expected = 3 * 10 * config.moe.top_k if config.moe_layers[layer] else 0
        assert per_layer[layer] == expected, layer
    assert (stats.imbalance() >= 1.0).all()


def test_router_stats_accumulate_over_prefill_and_decode(checkpoint_model):
    model = checkpoint_model("deepseek_v3")
    stats = RouterStats(model.config)
    gen = Generator(model, prefill_chunk=3, router_stats=stats)
    out = gen.generate(PROMPTS[:2], SamplingParams(max_tokens=5, ignore_eos=True))

    # every prompt token, then every generated token except the last, goes through the model
    processed = sum(len(p) for p in PROMPTS[:2]) + sum(len(c.token_ids) - 1 for c in out)
    for layer in model.config.moe_layer_ids:
        assert stats.tokens[layer].sum().item() == processed * model.config.moe.top_k
