"""Per-family checkpoint adapters: Hugging Face `config.json` -> `ModelConfig`, and our
parameter names -> the family's safetensors tensor names. One file per family."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedArchitecture
from .base import Adapter
from .deepseek import V2_ADAPTER, V3_ADAPTER
from .mixtral import ADAPTER as MIXTRAL_ADAPTER
from .olmoe import ADAPTER as OLMOE_ADAPTER
from .qwen_moe import QWEN2_ADAPTER, QWEN3_ADAPTER

_BY_TYPE: dict[str, Adapter] = {
    t: a
    for a in (MIXTRAL_ADAPTER, QWEN2_ADAPTER, QWEN3_ADAPTER, OLMOE_ADAPTER, V2_ADAPTER, V3_ADAPTER)
    for t in a.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_TYPE))


def adapter_for(raw_config: Mapping[str, Any]) -> Adapter:
    """The adapter for a checkpoint's config.json, or UnsupportedArchitecture naming the choices."""
    model_type = raw_config.get("model_type")
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    arch = raw_config.get("architectures") or ["?"]
    raise UnsupportedArchitecture(
        f"model_type '{model_type}' ({arch[0]}) is not supported; "
        f"expertmesh serves: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = ["SUPPORTED_MODEL_TYPES", "Adapter", "adapter_for"]
