"""Checkpoint loading and saving: partial experts, lazy reads, shards, round trips, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertmesh.models.adapters import SUPPORTED_MODEL_TYPES
from expertmesh.models.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    load_expert_bank,
    load_model,
    save_model,
)
from expertmesh.models.errors import (
    CheckpointError,
    ConfigError,
    ExpertNotLoaded,
    MissingTensor,
    UnsupportedArchitecture,
)


def _ids(seed: int = 1, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _copy(hf_checkpoint, family, tmp_path):
    src, _ = hf_checkpoint(family)
    dst = tmp_path / family
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, change) -> None:
    """Apply `change` to the tensors of one safetensors file and write it back."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- partial experts


def test_partial_load_materialises_exactly_the_requested_experts(hf_checkpoint):
    path, _ = hf_checkpoint("deepseek_v3")  # layer 0 dense, layers 1 and 2 MoE with 8 experts
    model = load_model(path, expert_ids={1: [5, 2], 2: [7]})
    full = load_model(path)

    bank1, bank2 = model.layers[1].moe.experts, model.layers[2].moe.experts
    assert bank1.expert_ids == (2, 5)
    assert bank2.expert_ids == (7,)
    moe = model.config.moe
    hidden = model.config.hidden_size
    assert bank1.gate_up.shape == (2, 2 * moe.expert_intermediate, hidden)
    assert bank1.down.shape == (2, hidden, moe.expert_intermediate)
    assert bank2.gate_up.shape == (1, 2 * moe.expert_intermediate, hidden)
    full_bank1 = full.layers[1].moe.experts
    assert torch.equal(bank1.gate_up, full_bank1.gate_up[[2, 5]])
    assert torch.equal(bank1.down, full_bank1.down[[2, 5]])


def test_routing_to_an_expert_that_is_not_loaded_raises_naming_layer_and_experts(hf_checkpoint):
    path, _ = hf_checkpoint("deepseek_v3")
    model = load_model(path, expert_ids={1: [0]})  # 2 experts per token: some must be missing

    with pytest.raises(ExpertNotLoaded) as err, torch.no_grad():
        model(_ids())
    assert err.value.layer == 1
    assert err.value.experts and 0 not in err.value.experts
    assert "layer 1" in str(err.value)
    assert str(err.value.experts) in str(err.value)


# ----------------------------------------------------------------------------- lazy expert bank


def test_load_expert_bank_equals_the_full_models_experts(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2_moe")
    full = load_model(path).layers[2].moe.experts
    bank = load_expert_bank(path, 2, [4, 1])

    assert bank.expert_ids == (1, 4)
    assert torch.equal(bank.gate_up, full.gate_up[[1, 4]])
    assert torch.equal(bank.down, full.down[[1, 4]])


def test_load_expert_bank_reads_only_the_requested_expert_tensors(hf_checkpoint, monkeypatch):
    path, _ = hf_checkpoint("mixtral")
    read: list[str] = []
    original_get = CheckpointReader.get

    def spy(self, name):
        read.append(name)
        return original_get(self, name)

    monkeypatch.setattr(CheckpointReader, "get", spy)
    load_expert_bank(path, 1, [3, 0])

    expected = {
        f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"
        for e in (0, 3)
        for w in ("w1", "w2", "w3")
    }
    assert set(read) == expected
    assert len(read) == len(expected)  # each tensor read once
    assert not any("attn" in n or "embed" in n or "lm_head" in n for n in read)


# ----------------------------------------------------------------------------- sharded checkpoints


def test_sharded_checkpoint_loads_through_the_index_json(hf_checkpoint):
    path, ref = hf_checkpoint("mixtral")  # saved with max_shard_size, so it has an index json
    assert (path / INDEX_FILE).is_file()
    assert not (path / SINGLE_FILE).exists()
    assert len(set(CheckpointReader(path).file_of.values())) > 1

    ours = load_model(path)
    with torch.no_grad():
        expected = ref(_ids()).logits
        got = ours(_ids())
    assert (got - expected).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- save round trip

ROUND_TRIP_FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")


@pytest.fixture(scope="module")
def saved(hf_checkpoint, tmp_path_factory):
    """saved(family) -> (source dir, re-saved dir with small shards, transformers reference)."""
    done = {}

    def get(family):
        if family not in done:
            src, ref = hf_checkpoint(family)
            out = tmp_path_factory.mktemp(f"resaved-{family}")
            save_model(load_model(src), out, max_shard_bytes=100_000)
            done[family] = (src, out, ref)
        return done[family]

    return get


@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
def test_save_model_writes_several_shards_and_an_index(family, saved):
    _, out, _ = saved(family)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / INDEX_FILE).read_text())

    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118 - safe_open is not a dict


@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
def test_saved_checkpoint_reloads_with_bit_identical_parameters(family, saved):
    src, out, _ = saved(family)
    before = load_model(src).state_dict()
    after = load_model(out).state_dict()

    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(family, saved):
    import transformers

    _, out, ref = saved(family)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = ref(_ids()).logits
        got = reloaded(_ids()).logits
    assert (got - expected).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- error messages


def test_missing_tensor_names_the_tensor_and_the_file(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint, "olmoe", tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite(path / SINGLE_FILE, lambda t: t.pop(name))

    with pytest.raises(MissingTensor) as err:
        load_model(path)
    assert err.value.tensor == name
    assert name in str(err.value)
    assert str(path / SINGLE_FILE) in str(err.value)


def test_tensor_in_the_index_but_absent_from_its_shard_is_a_missing_tensor(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint, "mixtral", tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = json.loads((path / INDEX_FILE).read_text())["weight_map"][name]
    _rewrite(path / shard, lambda t: t.pop(name))

    with pytest.raises(MissingTensor) as err:
        load_model(path)
    assert name in str(err.value)
    assert shard in str(err.value)


def test_unsupported_model_type_names_the_supported_types(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint, "olmoe", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))

    with pytest.raises(UnsupportedArchitecture) as err:
        load_model(path)
    assert "llama" in str(err.value)
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in str(err.value)


def test_malformed_config_json_is_a_config_error(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint, "olmoe", tmp_path)
    (path / "config.json").write_text('{"model_type": "olmoe", "hidden_size": ')

    with pytest.raises(ConfigError, match=r"config\.json"):
        load_model(path)


def test_missing_required_config_field_is_named(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint, "mixtral", tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["num_experts_per_tok"]
    (path / "config.json").write_text(json.dumps(config))

    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        load_model(path)


def test_nonexistent_directory_is_a_checkpoint_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="no-such-checkpoint"):
        load_model(missing)


def _assert_names_shapes(err: CheckpointError, name: str, got: tuple, want: tuple) -> None:
    message = str(err)
    assert name in message
    assert str(got) in message
    assert str(want) in message


def test_wrong_tensor_shape_names_the_tensor_and_both_shapes(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint, "olmoe", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = tuple(load_file(path / SINGLE_FILE)[name].shape)
    _rewrite(path / SINGLE_FILE, lambda t: t.update({name: t[name][:-1].clone()}))

    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_names_shapes(err.value, name, (want[0] - 1, want[1]), want)


def test_wrong_expert_tensor_shape_is_an_error_not_a_broadcast(hf_checkpoint, tmp_path):
    # A (1, hidden) tensor would broadcast into every row of (I, hidden) if copied blindly.
    path = _copy(hf_checkpoint, "olmoe", tmp_path)
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    want = tuple(load_file(path / SINGLE_FILE)[name].shape)
    _rewrite(path / SINGLE_FILE, lambda t: t.update({name: t[name][:1].clone()}))

    with pytest.raises(CheckpointError) as err:
        load_model(path)
    _assert_names_shapes(err.value, name, (1, want[1]), want)


def test_expert_not_loaded_survives_pickling_across_processes():
    """Ray ships a shard's error to the dispatcher pickled; it must come back as itself so the
    dispatcher sees a shard that lacks its experts (and recovers it) rather than a crash."""
    import pickle

    from expertmesh.models.errors import ExpertNotLoaded

    e = pickle.loads(pickle.dumps(ExpertNotLoaded(2, [6])))
    assert isinstance(e, ExpertNotLoaded) and (e.layer, e.experts) == (2, [6])
    assert "experts [6]" in str(e)
