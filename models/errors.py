"""Error types of the model core. Each names what is wrong and, where it can, the fix."""

from __future__ import annotations


class ModelError(Exception):
    """Base class for every error raised by `expertmesh.models`."""


class UnsupportedArchitecture(ModelError):
    """The checkpoint's `model_type` / `architectures` is not one we implement."""


class ConfigError(ModelError):
    """A field of `config.json` is missing or has a value we cannot serve."""


class CheckpointError(ModelError):
    """The checkpoint directory is unreadable or inconsistent."""


class MissingTensor(CheckpointError):
    """A tensor the model needs is absent from the checkpoint files."""

    def __init__(self, tensor: str, file: str) -> None:
        super().__init__(f"tensor '{tensor}' is missing from {file}")
        self.tensor = tensor
        self.file = file


class ExpertNotLoaded(ModelError):
    """Tokens were routed to an expert this process does not hold.

    Raised instead of skipping the expert: skipping would silently change the model's output.
    """

    def __init__(self, layer: int, experts: list[int]) -> None:
        super().__init__(f"layer {layer}: experts {experts} were routed to but are not loaded here")
        self.layer = layer
        self.experts = experts

    def __reduce__(self) -> tuple[type[ExpertNotLoaded], tuple[int, list[int]]]:
        # Crosses process boundaries inside Ray task errors: rebuild from the fields (the
        # default would call __init__ with the message alone and fail to unpickle).
        return (type(self), (self.layer, self.experts))


class GenerationError(ModelError):
    """Invalid generation request (bad sampling options, prompt too long, ...)."""
