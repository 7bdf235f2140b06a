"""The vLLM engine: ``AsyncLLM`` inside the API process (its engine core runs in a child process).

A swap reloads the weights in place instead of restarting the engine (~0.1 s instead of ~35 s on
CPU): pause → ``reload_weights`` and the tied output head re-packed (``serve.engine.vllm_worker``:
vLLM leaves it packed from the old weights) → reset the prefix cache (it holds the old weights'
KV, and would otherwise serve stale attention for prompts seen before) → resume.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from serve.adapters import adapter_rank, learns_with_lora
from serve.engine.base import Engine, EngineRequestError, RawDelta, SamplingOptions, TokenLogprobs


def configure_environment(data_dir: Path) -> None:
    """Settings vLLM reads from the environment at import: offline, caches in the data dir."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(data_dir / "cache" / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(data_dir / "cache" / "inductor"))


def max_rank(rank: int) -> int:
    """vLLM's ``max_lora_rank`` takes only these sizes: the smallest that fits ``rank``."""
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[dict[int, Any]] | None, top: int
) -> tuple[TokenLogprobs, ...]:
    """vLLM's logprobs of new tokens (one ``{token id: Logprob}`` per position: the sampled
    token's and the ``top`` most likely) in the engines' common form.

    The most likely are re-sorted and cut to ``top`` here: vLLM's dict holds the sampled token
    first and, when it is not among them, one entry more than asked.
    """
    if positions is None:
        return ()
    out = []
    for token, position in zip(token_ids, positions, strict=True):
        ranked = sorted(((t, p.logprob) for t, p in position.items()), key=lambda e: -e[1])
        out.append(TokenLogprobs(token, position[token].logprob, tuple(ranked[:top])))
    return tuple(out)


class VLLMEngine(Engine):
    """vLLM's asynchronous engine; settings that work on CPU (eager, bounded KV cache, fp32)."""

    name = "vllm"
    json_output = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._llm: Any = None
        # Runtime LoRA when policies over this base learn as adapters: it must be on from the
        # start, before the first adapter version exists.
        self.lora = learns_with_lora(self.base_dir, self.settings.lora_above)
        self._lora_ids = itertools.count(1)
        # One LoRARequest per adapter directory for the engine's life: vLLM keys adapters by
        # their int id, so swapping back to a version must reuse its id, not load a twin.
        self._loras: dict[str, Any] = {}

    async def start(self) -> None:
        configure_environment(self.settings.data_dir)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # Two adapters per batch: the old and the new version overlap while a swap's in-flight
        # requests finish. Kept loaded on CPU: as many as the registry keeps (rollbacks).
        lora = {"enable_lora": True, "max_lora_rank": max_rank(self.settings.lora_rank),
                "max_loras": 2, "max_cpu_loras": max(2, self.settings.keep_versions)
                } if self.lora else {}  # fmt: skip
        args = AsyncEngineArgs(
            model=self.base_dir,
            enforce_eager=True,
            kv_cache_memory_bytes=self.settings.kv_cache_bytes,
            max_model_len=self.max_model_len,
            dtype="float32",
            disable_log_stats=True,
            worker_extension_cls="serve.engine.vllm_worker.WeightReloadExtension",
            # JSON output without free whitespace: a small model otherwise fills max_tokens with
            # it (seen: the built-in model, asked for an object, answered "{" and 60 "\r").
            # vLLM allows that switch only with a named backend, so no fallback to guidance: a
            # schema xgrammar cannot compile is a 400 naming response_format.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **lora,
        )
        # Built on the event loop thread: its IPC sockets belong to this loop. Startup only.
        self._llm = AsyncLLM.from_engine_args(args)
        # Requests that surely run at once: the scheduler's sequences, n of them per request.
        seqs = self._llm.vllm_config.scheduler_config.max_num_seqs
        self.concurrency = max(1, seqs // self.settings.max_n)
        await self.start_adapter()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def problem(self) -> str | None:
        if self._llm is None:
            return "no vLLM engine (not started, or shut down)"
        return "the vLLM engine core died" if self._llm.errored else None

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def _reload(self, model_dir: str) -> None:
        await self._llm.pause_generation(mode="wait")
        try:
            await self._llm.collective_rpc(
                "reload_weights_and_head", kwargs={"weights_path": model_dir}
            )
            await self._llm.reset_prefix_cache()
        finally:
            await self._llm.resume_generation()

    async def _load_adapter(self, adapter_dir: str, version: str) -> Any:
        """Register the adapter with the engine (read from disk now, not on the first request
        that uses it) and return its ``LoRARequest``."""
        from vllm.lora.request import LoRARequest

        if not self.lora:
            raise EngineRequestError(
                f"{version} is a LoRA adapter but this engine's base is below "
                "LOOPCHAT_LORA_ABOVE, so runtime LoRA is off"
            )
        if adapter_rank(adapter_dir) > max_rank(self.settings.lora_rank):
            raise EngineRequestError(f"{version}: adapter rank above LOOPCHAT_LORA_RANK")
        request = self._loras.get(adapter_dir)
        if request is None:
            request = self._loras[adapter_dir] = LoRARequest(
                version, next(self._lora_ids), adapter_dir
            )
        await self._llm.add_lora(request)  # loads it again if vLLM evicted it meanwhile
        return request

    @staticmethod
    def _params(options: SamplingOptions) -> Any:
        """vLLM's ``SamplingParams`` for ``options`` (logprobs: vLLM's default raw distribution;
        a JSON Schema: structured outputs, compact JSON by xgrammar, see ``start``)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        schema = options.json_schema
        return SamplingParams(
            n=options.n,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_tokens,
            stop=list(options.stop) or None,
            seed=options.seed,
            logprobs=options.logprobs,
            structured_outputs=None if schema is None else StructuredOutputsParams(json=schema),
            output_kind=RequestOutputKind.DELTA,
        )

    async def unsupported(self, options: SamplingOptions) -> tuple[str, str] | None:
        """A JSON Schema vLLM cannot compile (invalid, unsatisfiable, too deep) is the
        client's: checked as vLLM checks a request (``SamplingParams.verify``), off the loop."""
        from vllm.exceptions import VLLMValidationError

        if options.json_schema is None:
            return None
        llm, params = self._llm, self._params(options)
        config = llm.vllm_config
        try:
            await asyncio.to_thread(
                params.verify,
                llm.model_config,
                config.speculative_config,
                config.structured_outputs_config,
                llm.tokenizer,
            )
        except VLLMValidationError as exc:
            return "response_format", f"the schema is not usable: {exc}"
        return None

    async def _stream(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions, adapter: Any
    ) -> AsyncGenerator[RawDelta, None]:
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMValidationError

        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        top = options.logprobs or 0
        try:
            async for output in self._llm.generate(
                prompt, self._params(options), request_id, lora_request=adapter
            ):
                for choice in output.outputs:
                    ids = choice.token_ids
                    steps = token_logprobs(ids, choice.logprobs, top)
                    yield choice.index, choice.text, len(ids), choice.finish_reason, steps
        except VLLMValidationError as exc:
            raise EngineRequestError(str(exc)) from None
