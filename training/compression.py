"""What the compression jobs (quantize, prune) share: held-out data and size accounting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from expertmesh.models.model import MoEModel
from expertmesh.models.tokenizer import Tokenizer

from .config import CorpusSection, EvalSection

if TYPE_CHECKING:
    from .pretrain import LMData


def eval_data(model_dir: Path, section: EvalSection) -> LMData:
    """Training tokens and held-out (n, seq_len + 1) windows, in the model's own tokenizer."""
    from .pretrain import prepare_lm_data

    corpus = CorpusSection(
        corpus=section.corpus,
        files=section.files,
        cache_dir=section.cache_dir,
        val_fraction=section.val_fraction,
        seq_len=section.seq_len,
        val_windows=section.val_windows,
    )
    return prepare_lm_data(corpus, Tokenizer.from_dir(model_dir), model_dir)


def param_bytes(model: MoEModel) -> int:
    """Bytes of all parameters (tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def expert_bytes(model: MoEModel) -> int:
    """Bytes of the routed experts' weights and scales."""
    return sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name
    )


def checkpoint_bytes(path: Path) -> int:
    """Size of a checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
