"""The self-correcting tool-integrated decoder (THOR's inference loop).

Owns: running one or n trajectories from prompt token ids. Each tool round is
one generation request that stops exactly at the closing fence of a code block;
the block runs in the sandbox (awaited, never blocking the event loop); the
observation is formatted by the reference rules and appended *as tokens*; the
next request continues from the whole token sequence, so vLLM's prefix cache
serves everything but the new tokens. When a call fails, self-correction drops
the failed block plus `backtrack_tokens` tokens before it (or back to the start
of its reasoning step), never crossing the prompt or a committed observation,
and resamples; discarded tokens are counted. Budgets (tool calls, new tokens,
context length, thinking tokens) each end a trajectory with their own
`FinishReason`. Everything is reported as typed events (events.py); the last
event of each sample is `Final`, carrying the token-level trajectory.

Does not own: the engine (backend.py), code execution (tools.py), observation
formatting (observation.py), fence parsing (codeblocks.py) or answer checking
(answer.py). Knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from .answer import extract_boxed, majority_vote, normalize_answer
from .backend import GenChunk, GenerationBackend, GenParams
from .codeblocks import CodeBlock as FencedBlock
from .codeblocks import is_code_language, trailing_block
from .config import SamplingOptions, ThorConfig
from .events import Backtrack, CodeBlock, Event, Final, FinishReason, TextDelta, ToolCall, ToolStats, Usage, Vote
from .observation import injection, judge
from .prompting import is_reasoning_model
from .streams import merge
from .tools import ToolExecutor
from .trajectory import SegmentKind, Trajectory

log = logging.getLogger("thor_engine.decoder")

#: Generation stops here: a closing fence on its own line. Opening fences never match
#: (they carry an info string), except an untagged "```" opening, which the loop
#: recognises and simply continues past.
FENCE_STOP = "\n```\n"
#: Models that invent their own output block after the code stop at its opening.
OUTPUT_STOP = "```output"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class _Counters:
    engine_requests: int = 0
    generated: int = 0
    discarded: int = 0
    cached_prompt: int = 0
    prefilled_prompt: int = 0


@dataclass
class _State:
    traj: Trajectory
    in_think: bool
    think_closed: bool = False  # </think> seen or the thinking cut injected
    tools_active: bool = True
    think_tokens: int = 0
    tool_budget_used: int = 0
    call_index: int = 0
    attempt: int = 0
    stats: ToolStats = field(default_factory=ToolStats)
    counters: _Counters = field(default_factory=_Counters)


class ThorDecoder:
    """Runs THOR trajectories on a `GenerationBackend` with a `ToolExecutor`."""

    def __init__(self, backend: GenerationBackend, executor: ToolExecutor) -> None:
        self.backend = backend
        self.executor = executor
        self.tokenizer = backend.tokenizer
        self.reasoning_model = is_reasoning_model(self.tokenizer)

    # --- public API --------------------------------------------------------------------

    async def stream(
        self,
        prompt_token_ids: Sequence[int],
        config: ThorConfig | None = None,
        sampling: SamplingOptions | None = None,
        *,
        n: int = 1,
        vote: bool = False,
        request_id: str | None = None,
        include_trajectory: bool = True,
    ) -> AsyncIterator[Event]:
        """Events of n concurrent trajectories, interleaved as they happen.

        Closing the iterator (or cancelling its consumer) aborts every engine request
        and in-flight sandbox call of this request.
        """
        config = config or ThorConfig()
        sampling = sampling or SamplingOptions()
        if n < 1:
            raise ValueError("n must be at least 1")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.backend.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.backend.max_model_len}"
            )
        rid = request_id or uuid.uuid4().hex
        if n == 1:
            async with contextlib.aclosing(self._run(prompt, config, sampling, 0, rid, include_trajectory)) as it:
                async for ev in it:
                    yield ev
            return

        def sample(i: int) -> Callable[[], AsyncIterator[Event]]:
            seeded = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + i})
            return lambda: self._run(prompt, config, seeded, i, rid, include_trajectory)

        answers: list[str | None] = [None] * n
        async with contextlib.aclosing(merge([sample(i) for i in range(n)])) as merged:
            async for ev in merged:
                if isinstance(ev, Final):
                    answers[ev.sample] = ev.answer
                yield ev
        if vote:
            yield self.vote(answers)

    @staticmethod
    def vote(answers: list[str | None]) -> Vote:
        counts = Counter(n for n in (normalize_answer(a) for a in answers if a is not None) if n)
        return Vote(answer=majority_vote(answers), counts=dict(counts))

    # --- one trajectory -----------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _prefix_len_at(self, ids: list[int], char_offset: int) -> int:
        """Largest k such that decode(ids[:k]) has at most char_offset characters."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._decode(ids[:mid])) <= char_offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _channel_split(self, st: _State, text: str) -> list[TextDelta]:
        """Split a text delta at <think> tags into reasoning / answer pieces."""
        if not self.reasoning_model:
            return [TextDelta(text=text, channel="reasoning")] if text else []
        out: list[TextDelta] = []
        while text:
            tag = THINK_CLOSE if st.in_think else THINK_OPEN
            idx = text.find(tag)
            if idx < 0:
                out.append(TextDelta(text=text, channel="reasoning" if st.in_think else "answer"))
                break
            head = text[: idx + len(tag)]
            out.append(TextDelta(text=head, channel="reasoning"))
            if st.in_think:
                st.think_closed = True
            st.in_think = not st.in_think
            text = text[idx + len(tag):]
        return [d for d in out if d.text]

    async def _run(
        self,
        prompt: list[int],
        cfg: ThorConfig,
        sampling: SamplingOptions,
        sample: int,
        rid: str,
        include_trajectory: bool,
    ) -> AsyncIterator[Event]:
        prompt_text_tail = self._decode(prompt[-8:])
        st = _State(
            traj=Trajectory.from_prompt(prompt),
            in_think=self.reasoning_model and prompt_text_tail.rstrip().endswith(THINK_OPEN),
        )
        st.tools_active = cfg.max_tool_calls > 0 or cfg.on_tool_budget == "stop"
        eos = self.backend.eos_token_ids
        max_len = self.backend.max_model_len
        budget = sampling.max_tokens if sampling.max_tokens is not None else max_len - len(prompt)
        sc = cfg.self_correction

        def emit(ev: Event) -> Event:
            ev.sample = sample  # type: ignore[union-attr]
            return ev

        finish: FinishReason
        while True:
            completion_len = len(st.traj) - len(prompt)
            remaining = budget - completion_len
            room = max_len - len(st.traj)
            if remaining <= 0:
                finish = FinishReason.length
                break
            if room <= 0:
                finish = FinishReason.context_length
                break
            req_max = min(remaining, room)
            think_limited = False
            if cfg.thinking_budget is not None and self.reasoning_model and not st.think_closed:
                think_room = cfg.thinking_budget - st.think_tokens
                if think_room <= 0:
                    for ev in self._cut_thinking(st, cfg):
                        yield emit(ev)
                    continue
                if think_room < req_max:
                    req_max, think_limited = think_room, True

            stops = list(sampling.stop)
            if st.tools_active:
                stops += [FENCE_STOP, OUTPUT_STOP]
            temperature = sampling.temperature
            if st.attempt > 0 and temperature == 0:
                temperature = sc.retry_temperature
            seed = None if sampling.seed is None else sampling.seed + 7919 * st.counters.engine_requests
            if seed is None and st.attempt > 0:
                # resamples of an unseeded request still get a seed derived from its id: reproducible logs
                seed = zlib.crc32(f"{rid}-{sample}-{st.counters.engine_requests}".encode())
            params = GenParams(
                max_tokens=req_max, temperature=temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=seed, stop=tuple(stops),
            )
            req_id = f"{rid}-{sample}-{st.counters.engine_requests}"
            st.counters.engine_requests += 1
            request_prompt_len = len(st.traj)
            new_ids: list[int] = []
            streamed = ""
            last: GenChunk | None = None
            async with contextlib.aclosing(self.backend.generate(st.traj.token_ids, params, req_id)) as gen:
                async for chunk in gen:
                    if chunk.num_cached_tokens is not None and st.counters.engine_requests > 1:
                        st.counters.cached_prompt += chunk.num_cached_tokens
                        st.counters.prefilled_prompt += request_prompt_len - chunk.num_cached_tokens
                    if chunk.token_ids:
                        st.traj.append(chunk.token_ids, SegmentKind.model)
                        new_ids.extend(chunk.token_ids)
                        st.counters.generated += len(chunk.token_ids)
                        if not st.think_closed:
                            st.think_tokens += len(chunk.token_ids)
                    if chunk.text:
                        streamed += chunk.text
                        for ev in self._channel_split(st, chunk.text):
                            yield emit(ev)
                    last = chunk
            # Stop strings can end inside a token: the tokens are the truth, so emit
            # whatever their decoded text holds beyond what was streamed.
            decoded = self._decode(new_ids)
            if decoded.startswith(streamed) and len(decoded) > len(streamed):
                for ev in self._channel_split(st, decoded[len(streamed):]):
                    yield emit(ev)
            if last is None or not last.finished:
                finish = FinishReason.aborted
                break
            if last.finish_reason == "length":
                if think_limited:
                    continue  # the thinking budget is spent: cut it on the next turn
                finish = FinishReason.length if remaining <= room else FinishReason.context_length
                break
            if last.finish_reason == "abort":
                finish = FinishReason.aborted
                break

            user_stop = last.stop_reason is not None and last.stop_reason in sampling.stop
            fence_stop = last.stop_reason in (FENCE_STOP, OUTPUT_STOP)
            eos_stop = last.stop_reason is None
            if user_stop:
                finish = FinishReason.stop
                break
            round_ids = st.traj.token_ids[st.traj.protected:]
            round_text = self._decode(round_ids)
            block = trailing_block(round_text)
            is_code = block is not None and is_code_language(block.language, cfg.code_languages)
            if not is_code or not (fence_stop or eos_stop) or not st.tools_active:
                if fence_stop:
                    continue  # an untagged opening fence or a non-code block: keep generating
                finish = FinishReason.stop
                break
            assert block is not None
            if st.tool_budget_used >= cfg.max_tool_calls:
                if cfg.on_tool_budget == "stop":
                    finish = FinishReason.tool_budget
                    break
                st.tools_active = False
                if eos_stop:
                    finish = FinishReason.stop
                    break
                continue
            if eos_stop and new_ids and new_ids[-1] in eos:
                # the model closed its block and ended: run the block, then let it go on
                st.traj.truncate(len(st.traj) - 1)
                round_ids = round_ids[:-1]

            ended: FinishReason | None = None
            async for ev in self._tool_round(st, cfg, block, round_ids, round_text):
                if isinstance(ev, FinishReason):
                    ended = ev
                else:
                    yield emit(ev)
            if ended is not None:
                finish = ended
                break

        yield emit(self._final(st, prompt, finish, cfg, include_trajectory))

    def _cut_thinking(self, st: _State, cfg: ThorConfig) -> list[Event]:
        ids = self.tokenizer.encode(cfg.thinking_cut_text, add_special_tokens=False)
        st.traj.append(ids, SegmentKind.injected)
        st.traj.protect()
        st.think_closed = True
        st.tools_active = False  # the answer after a cut is written without tools
        return list(self._channel_split(st, cfg.thinking_cut_text))

    async def _tool_round(
        self, st: _State, cfg: ThorConfig, block: FencedBlock, round_ids: list[int], round_text: str
    ) -> AsyncIterator[Event | FinishReason]:
        sc = cfg.self_correction
        call, attempt = st.call_index, st.attempt
        st.call_index += 1
        yield CodeBlock(call=call, attempt=attempt, language=block.language, code=block.code)
        result = await self.executor.execute(
            block.code,
            timeout_s=cfg.observation.timeout_s,
            echo_last_expression=cfg.observation.profile == "notebook",
        )
        obs = judge(result.exit_code, result.stdout, result.stderr, cfg.observation)
        st.stats.calls += 1
        st.stats.duration_s += result.duration_s
        if obs.ok:
            st.stats.ok += 1
        else:
            st.stats.failed += 1
        retry = not obs.ok and sc.enabled and attempt < sc.max_retries
        if not retry or sc.retries_consume_budget:
            st.tool_budget_used += 1
        yield ToolCall(
            call=call, attempt=attempt, ok=obs.ok, outcome=result.outcome, exit_code=result.exit_code,
            stdout=result.stdout, stderr=result.stderr, observation=obs.text, duration_s=result.duration_s,
            cached=result.cached, committed=not retry,
        )
        if retry:
            yield self._backtrack(st, cfg, block, round_ids, round_text, call, reason=result.outcome)
            return
        st.attempt = 0
        st.stats.committed += 1
        text = injection(obs.text, round_text.endswith("\n"))
        st.traj.append(self.tokenizer.encode(text, add_special_tokens=False), SegmentKind.observation)
        st.traj.protect()
        for ev in self._channel_split(st, text):
            yield ev
        if not obs.ok and cfg.stop_on_tool_error:
            yield FinishReason.tool_error
            return
        if st.tool_budget_used >= cfg.max_tool_calls and cfg.on_tool_budget == "continue":
            st.tools_active = False

    def _backtrack(
        self, st: _State, cfg: ThorConfig, block: FencedBlock, round_ids: list[int], round_text: str,
        call: int, reason: str,
    ) -> Backtrack:
        sc = cfg.self_correction
        base = st.traj.protected
        block_tok = self._prefix_len_at(round_ids, block.start)
        if sc.mode == "tokens":
            keep = max(0, block_tok - sc.backtrack_tokens)
        else:
            boundary = round_text.rfind("\n\n", 0, block.start)
            keep = self._prefix_len_at(round_ids, boundary + 2) if boundary >= 0 else 0
            keep = min(keep, block_tok)
        # streamed text so far this round = round_text; after the cut it is decode(kept)
        kept_text = self._decode(round_ids[:keep])
        common = len(os.path.commonprefix([round_text, kept_text]))
        dropped = st.traj.truncate(base + keep)
        st.counters.discarded += len(dropped)
        st.stats.backtracks += 1
        st.attempt += 1
        if self.reasoning_model:
            prefix = self._decode(st.traj.token_ids[-4096:])
            st.in_think = prefix.rfind(THINK_OPEN) > prefix.rfind(THINK_CLOSE)
        return Backtrack(
            call=call, attempt=st.attempt, reason=reason, mode=sc.mode,
            tokens_dropped=len(dropped), chars_retracted=len(round_text) - common,
        )

    def _final(
        self, st: _State, prompt: list[int], finish: FinishReason, cfg: ThorConfig, include_trajectory: bool
    ) -> Final:
        traj = st.traj
        completion_ids = traj.token_ids[len(prompt):]
        text = self._decode(completion_ids)
        if self.reasoning_model and THINK_CLOSE in text:
            answer_text = text.rsplit(THINK_CLOSE, 1)[1]
        else:
            answer_text = self._decode(traj.token_ids[max(traj.protected, len(prompt)):])
        c = st.counters
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=len(completion_ids),
            model_tokens=traj.count(SegmentKind.model),
            observation_tokens=traj.count(SegmentKind.observation),
            injected_tokens=traj.count(SegmentKind.injected),
            discarded_tokens=c.discarded,
            generated_tokens=c.generated,
            cached_prompt_tokens=c.cached_prompt,
            prefilled_prompt_tokens=c.prefilled_prompt,
            engine_requests=c.engine_requests,
        )
        return Final(
            text=text, answer_text=answer_text.strip(), answer=extract_boxed(text), finish_reason=finish,
            usage=usage, tools=st.stats, trajectory=traj.to_dict() if include_trajectory else None,
        )


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    """Drain an event stream into a list (for scripts and tests)."""
    return [ev async for ev in events]


def finals(events: list[Event]) -> list[Final]:
    out = [e for e in events if isinstance(e, Final)]
    return sorted(out, key=lambda f: f.sample)


__all__ = ["ThorDecoder", "collect", "finals", "FENCE_STOP", "OUTPUT_STOP"]
