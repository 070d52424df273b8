"""Hugging Face safetensors checkpoints: lazy reading, partial loading, saving.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards named in
`model.safetensors.index.json`. Tensors are read one at a time through `safe_open` (memory
mapped), so a caller can load only some experts of some layers: the cluster puts each expert
shard on a different node and every node reads only its own experts from disk.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import Adapter, adapter_for
from .adapters.base import ExpertProj
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, MissingTensor
from .model import ExpertBank, MoEModel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8_EXPERTS = "expertmesh_int8_experts"
"""`quantization_config.quant_method` of checkpoints whose routed experts are int8: each expert
projection `...weight` is int8 (out, in) and `...weight_scale` its float per-output-channel
scale (out,); every other tensor is float. Written by `expertmesh train quantize`."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(path: str | Path) -> ModelConfig:
    """Parse `<path>/config.json` into our ModelConfig via the family's adapter."""
    raw, adapter = _read_raw_and_adapter(Path(path))
    return parse_config(raw, adapter)


def parse_config(raw: Mapping[str, Any], adapter: Adapter) -> ModelConfig:
    """The family's config plus the checkpoint's weight format (`quantization_config`)."""
    cfg = adapter.parse_config(raw)
    quant = raw.get("quantization_config")
    if quant is None:
        return cfg
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != INT8_EXPERTS:
        raise ConfigError(
            f"config.json: quantization_config.quant_method {method!r} is not supported; "
            f"expertmesh loads '{INT8_EXPERTS}' (int8 routed experts) or unquantised checkpoints"
        )
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_weights="int8"))


def _read_raw_and_adapter(path: Path) -> tuple[dict[str, Any], Adapter]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint directory needs config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object")
    return raw, adapter_for(raw)


def _open_weights(path: Path) -> Any:
    """`safe_open` a weights file; one that does not parse (a corrupt header, a truncated copy)
    is a `CheckpointError` naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError (not importable by name)
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); re-copy it from the source"
        ) from e


class CheckpointReader:
    """Lazy access to the tensors of one checkpoint directory by their checkpoint names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        raw, self.adapter = _read_raw_and_adapter(self.path)
        self.config = parse_config(raw, self.adapter)
        self.file_of = self._index()
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}  # file -> tensor names it really holds

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(
                    f"{index} is malformed: needs a 'weight_map' object ({e})"
                ) from e
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.path} holds no {SINGLE_FILE} and no {INDEX_FILE}")
        with _open_weights(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            full = self.path / file
            if not full.is_file():
                raise CheckpointError(f"shard {full} named in {INDEX_FILE} does not exist")
            handle = _open_weights(full)
            self._handles[file] = handle
            self._keys[file] = set(handle.keys())
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of.get(name)
        if file is None:
            where = INDEX_FILE if (self.path / INDEX_FILE).is_file() else SINGLE_FILE
            raise MissingTensor(name, str(self.path / where))
        handle = self._handle(file)
        if name not in self._keys[file]:  # the index names a shard that lacks it
            raise MissingTensor(name, str(self.path / file))
        return handle.get_tensor(name)

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) weights of one routed expert."""
        a = self.adapter
        return (
            self.get(a.expert_name(layer, expert, "gate_proj")),
            self.get(a.expert_name(layer, expert, "up_proj")),
            self.get(a.expert_name(layer, expert, "down_proj")),
        )


def _check_shape(
    reader: CheckpointReader, name: str, tensor: torch.Tensor, shape: torch.Size
) -> None:
    # copy_ would broadcast e.g. a (1, hidden) tensor into (I, hidden) without a word.
    if tensor.shape != shape:
        raise CheckpointError(
            f"tensor '{name}' in {reader.path} has shape {tuple(tensor.shape)}, "
            f"config.json implies {tuple(shape)}"
        )


def _check_expert_selection(
    cfg: ModelConfig, layer: int, ids: Iterable[int], path: str | Path
) -> None:
    if not (0 <= layer < cfg.num_layers) or not cfg.moe_layers[layer]:
        raise CheckpointError(
            f"layer {layer} is not a MoE layer of {path} (MoE layers: {cfg.moe_layer_ids})"
        )
    bad = [e for e in ids if not 0 <= e < cfg.moe.num_experts]
    if bad:
        raise CheckpointError(
            f"experts {bad} do not exist; layer {layer} has {cfg.moe.num_experts}"
        )


PROJS: tuple[ExpertProj, ...] = ("gate_proj", "up_proj", "down_proj")


def _expert_slices(
    bank: ExpertBank, slot: int
) -> list[tuple[ExpertProj, torch.Tensor, torch.Tensor | None]]:
    """(projection, weight view, scale view or None) of one expert's three projections."""
    i = bank.intermediate
    weights = (bank.gate_up[slot, :i], bank.gate_up[slot, i:], bank.down[slot])
    if not bank.quantized:
        return [(proj, w, None) for proj, w in zip(PROJS, weights)]
    assert bank.gate_up_scale is not None and bank.down_scale is not None
    scales = (bank.gate_up_scale[slot, :i], bank.gate_up_scale[slot, i:], bank.down_scale[slot])
    return list(zip(PROJS, weights, scales))


def _fill_expert_bank(bank: ExpertBank, reader: CheckpointReader) -> None:
    with torch.no_grad():
        for slot, e in enumerate(bank.expert_ids):
            for proj, target, scale in _expert_slices(bank, slot):
                name = reader.adapter.expert_name(bank.layer, e, proj)
                tensor = reader.get(name)
                _check_shape(reader, name, tensor, target.shape)
                if (tensor.dtype == torch.int8) != bank.quantized:
                    expected = (
                        "int8 (config.json declares int8 experts)"
                        if bank.quantized
                        else ("float (config.json has no quantization_config)")
                    )
                    raise CheckpointError(
                        f"tensor '{name}' in {reader.path} is {tensor.dtype}, expected {expected}"
                    )
                target.copy_(tensor)
                if scale is not None:
                    scale_tensor = reader.get(name + "_scale")
                    _check_shape(reader, name + "_scale", scale_tensor, scale.shape)
                    scale.copy_(scale_tensor)


def load_expert_bank(
    path: str | Path,
    layer: int,
    expert_ids: Iterable[int],
    dtype: str | torch.dtype = "float32",
    device: torch.device | str = "cpu",
) -> ExpertBank:
    """Only the given experts of one layer, read straight from disk (for expert shard actors),
    on `device`."""
    reader = CheckpointReader(path)
    cfg = reader.config
    ids = sorted(set(expert_ids))
    _check_expert_selection(cfg, layer, ids, path)
    with torch.device("meta"):
        bank = ExpertBank(layer, cfg.hidden_size, cfg.moe, cfg.hidden_act, ids)
    bank = bank.to_empty(device=device).to(resolve_dtype(dtype))
    _fill_expert_bank(bank, reader)
    return bank


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    expert_ids: Mapping[int, Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
) -> MoEModel:
    """Build our model from a checkpoint directory, on `device` (tensors are copied there from
    the memory-mapped files one at a time).

    `expert_ids` ({layer: ids}) loads only those routed experts of those layers; every other
    tensor is loaded in full. Construction happens on the meta device, so no memory is spent
    on random initialisation of weights that are about to be overwritten.
    """
    reader = CheckpointReader(path)
    cfg = reader.config
    for layer, ids in (expert_ids or {}).items():
        _check_expert_selection(cfg, layer, ids, path)
    with torch.device("meta"):
        model = MoEModel(cfg, expert_ids)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=True):
            if ".experts." in name:
                continue
            hf = reader.adapter.hf_name(name)
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if name.endswith("score_bias") and not reader.has(hf):
                param.zero_()  # older V3 exports omit a zero bias
                continue
            tensor = reader.get(hf)
            _check_shape(reader, hf, tensor, param.shape)
            param.copy_(tensor)
        for block in model.blocks:
            if block.moe is not None:
                _fill_expert_bank(block.moe.experts, reader)
    model = model.to(resolve_dtype(dtype))
    if cfg.moe.router_in_fp32:  # DeepSeek keeps router weights and bias in fp32
        for block in model.blocks:
            if block.moe is not None:
                block.moe.router.float()
    return model.eval()


def state_for_save(model: MoEModel, adapter: Adapter) -> dict[str, torch.Tensor]:
    """Our parameters under the family's checkpoint names (experts split back per expert)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if ".experts." in name or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        out[adapter.hf_name(name)] = param.detach().cpu().contiguous()
    for layer in model.blocks:
        if layer.moe is None:
            continue
        bank = layer.moe.experts
        if not bank.complete:
            raise CheckpointError(
                f"layer {bank.layer} holds only experts {bank.expert_ids}; cannot save a partial model"
            )
        for slot, e in enumerate(bank.expert_ids):
            for proj, weight, scale in _expert_slices(bank, slot):
                name = adapter.expert_name(bank.layer, e, proj)
                out[name] = weight.detach().cpu().contiguous()
                if scale is not None:
                    out[name + "_scale"] = scale.detach().cpu().contiguous()
    return out


def config_for_save(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as we write it: the file we read, plus every field other engines read for
    the family stated explicitly with the value our maths uses (`Adapter.export_fields`;
    e.g. DeepSeek-V3's `topk_method: noaux_tc`, without which vLLM has no slot for
    `e_score_correction_bias`)."""
    adapter = adapter_for(cfg.raw or {"model_type": cfg.model_type})
    raw = {**cfg.raw, **adapter.export_fields(cfg)}
    raw["dtype"] = str(dtype).removeprefix("torch.")
    raw.pop("torch_dtype", None)
    return raw


def save_model(
    model: MoEModel,
    path: str | Path,
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a Hugging Face checkpoint: config.json, safetensors shard(s) and index json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    adapter = adapter_for(cfg.raw or {"model_type": cfg.model_type})
    state = state_for_save(model, adapter)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt", "producer": "expertmesh"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / file), metadata=meta)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    raw = config_for_save(cfg, model.dtype)
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file() and src.resolve() != (path / name).resolve():
                shutil.copy(src, path / name)
    return path
