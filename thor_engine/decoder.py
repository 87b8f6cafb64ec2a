"""The self-correcting tool-integrated decoder (THOR's inference loop).

Owns: running one or n trajectories from prompt token ids. Each tool round is
one generation request that ends the moment a code block closes (a stop string
for the common fence, and `FenceWatch` over the text for every other closing
fence: trailing spaces, `\\r\\n`, indentation, longer fences) or the model opens
an ```` ```output ```` block of its own (its invented output is cut, never kept,
and the code before it runs). The block runs in the sandbox (awaited, never
blocking the event loop); the observation is formatted by the reference rules
and appended *as tokens* (plain text: control tokens it spells stay text); the next request continues from the whole token
sequence, so vLLM's prefix cache serves everything but the new tokens. A complete
code block at the end of a round is always executed, refused with an
observation (budget spent, answer after a thinking cut), or ends the trajectory
(`on_tool_budget="stop"`): never passed over. When a call fails and a resample is
still affordable (retries and tool budget left), self-correction drops the failed
block plus `backtrack_tokens` tokens before it (or back to the start of its
reasoning step), never crossing the prompt or a committed observation, and
resamples; discarded tokens are counted. Budgets (tool calls, new tokens, a hard
cap on generated tokens including discarded ones, context length, thinking
tokens) each end a trajectory with their own `FinishReason`. For RL: with
`stop_after_execution` the trajectory ends right after its first executed block,
without the observation (`FinishReason.tool_executed`); every `CodeBlock` names the
trajectory token holding its opening fence (`fence_token`, where step-level RL cuts);
with `SamplingOptions.logprobs` each request asks the engine for the sampled
token's log-probability and the trajectory keeps one per token. With
`ThorConfig.repetition` a `RepetitionDetector` (repetition.py) watches the model's own
kept tokens as they arrive (tool outputs and injected text left out; rebuilt from the
kept tail after a cut or backtrack, so discarded attempts never count) and a loop aborts
the engine request and ends the trajectory with `FinishReason.repetition`, its text kept.

Text is tracked incrementally per token (detokenize.TokenText), so no round is
decoded twice and a backtrack's cut point is an integer search. Text is streamed
as typed events (events.py) in exactly the order it enters the trajectory: text
that might still be cut (a line that may become a fence, a prefix of a stop
string or a think tag) is held back until it is decided, so concatenating the
`TextDelta`s, minus what `Backtrack`s retract, is exactly `Final.text`. The last
event of each sample is `Final`, carrying the token-level trajectory.

Does not own: the engine (backend.py), code execution (tools.py), observation
formatting (observation.py), fence parsing (codeblocks.py) or answer checking
(answer/). Knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from .answer import extract_boxed, majority_vote, normalize_answer
from .backend import GenChunk, GenerationBackend, GenParams
from .codeblocks import CodeBlock as FencedBlock
from .codeblocks import FenceEvent, FenceWatch, find_blocks, is_code_language, trailing_block
from .config import SamplingOptions, ThorConfig
from .detokenize import TokenText
from .events import Backtrack, CodeBlock, Event, Final, FinishReason, TextDelta, ToolCall, ToolStats, Usage, Vote
from .final_answer import FinalAnswer
from .observation import injection, judge
from .prompting import encode_plain, is_reasoning_model
from .repetition import RepetitionDetector
from .streams import merge
from .tools import ToolExecutor
from .trajectory import SegmentKind, Trajectory

log = logging.getLogger("thor_engine.decoder")

#: The engine stops here (cheaply, inside vLLM) for the common closing fence; FenceWatch
#: catches every other form of closing fence in the streamed text.
FENCE_STOP = "\n```\n"
#: Models that invent their own output block after the code stop at its opening.
OUTPUT_STOP = "```output"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
#: Default hard cap on generated tokens, as a multiple of the trajectory's token budget.
GENERATION_CAP_FACTOR = 4


@dataclass
class _Counters:
    engine_requests: int = 0
    generated: int = 0
    discarded: int = 0
    cached_prompt: int = 0
    prompt_cached: int = 0
    prefilled_prompt: int = 0


@dataclass
class _State:
    traj: Trajectory
    text: TokenText  # the completion (everything after the prompt), token by token
    prompt_len: int
    prompt_in_think: bool  # the prompt leaves the model inside <think>
    prompt_think_closed: bool  # the prompt's last think tag is </think> (thinking switched off)
    tools_on: bool  # fences are watched (THOR tools were requested at all)
    languages: tuple[str, ...]  # fence info strings of executable code
    watch: FenceWatch | None = None
    emitted: int = 0  # characters of `text` already sent as TextDelta
    emit_in_think: bool = False
    cut: bool = False  # the thinking budget cut was injected
    tool_budget_used: int = 0
    call_index: int = 0
    attempt: int = 0
    executions: int = 0
    stats: ToolStats = field(default_factory=ToolStats)
    counters: _Counters = field(default_factory=_Counters)
    loop: RepetitionDetector | None = None  # ThorConfig.repetition: fed the model's kept tokens
    loop_fed: int = 0  # model tokens of the trajectory the detector has seen...
    loop_cuts: int = 0  # ...as of this many truncations of the trajectory
    stop_string: str | None = None  # the request's stop string that ended the trajectory

    @property
    def round_start(self) -> int:
        """Character offset (in the completion) where the current round began: nothing before it moves."""
        return self.text.offset(self.traj.protected - self.prompt_len)


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
        final: FinalAnswer | None = None,
    ) -> AsyncIterator[Event]:
        """Events of n concurrent trajectories, interleaved as they happen (then a `Vote` if asked).

        With `final`, each trajectory that ends by the model's own stop continues into a
        constrained answer (final_answer.py); with the tools off, that answer is the whole output.
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

        def sample(i: int) -> Callable[[], AsyncIterator[Event]]:
            seeded = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + i})
            return lambda: self._run(prompt, config, seeded, i, rid, include_trajectory, final)

        answers: list[str | None] = [None] * n
        async with contextlib.aclosing(merge([sample(i) for i in range(n)]) if n > 1 else sample(0)()) as events:
            async for ev in events:
                if isinstance(ev, Final):
                    answers[ev.sample] = ev.answer
                yield ev
        if vote:
            yield self.vote(answers)

    @staticmethod
    def vote(answers: list[str | None]) -> Vote:
        """Majority over the samples' answers; `counts` is keyed by the spelling `answer` uses."""
        spelling: dict[str, str] = {}
        counts: dict[str, int] = {}
        for a in answers:
            if a is None or not (key := normalize_answer(a)):
                continue
            name = spelling.setdefault(key, a)
            counts[name] = counts.get(name, 0) + 1
        return Vote(answer=majority_vote(answers), counts=counts)

    # --- text bookkeeping ---------------------------------------------------------------

    def _append(
        self, st: _State, ids: list[int], kind: SegmentKind, logprobs: list[float | None] | None = None
    ) -> None:
        st.traj.append(ids, kind, logprobs)
        st.text.extend(ids)

    def _take(self, st: _State, chunk: GenChunk, request_prompt_len: int, logprobs: bool) -> None:
        """One engine chunk into the trajectory: the prefix-cache counters, then its tokens."""
        if chunk.num_cached_tokens is not None and st.counters.engine_requests == 1:
            st.counters.prompt_cached = chunk.num_cached_tokens
        elif chunk.num_cached_tokens is not None:
            st.counters.cached_prompt += chunk.num_cached_tokens
            st.counters.prefilled_prompt += request_prompt_len - chunk.num_cached_tokens
        if chunk.token_ids:
            self._append(st, chunk.token_ids, SegmentKind.model, _sampled_logprobs(chunk) if logprobs else None)
            st.counters.generated += len(chunk.token_ids)

    def _fence_token(self, st: _State, block: FencedBlock) -> int:
        """Index in the trajectory (prompt included) of the token holding the opening fence's first backtick."""
        text = st.text.text
        pos = block.start
        while pos < len(text) and text[pos] in " \t":  # an indented fence: its line starts with the indentation
            pos += 1
        return st.prompt_len + st.text.tokens_within(pos)

    def _truncate_chars(self, st: _State, pos: int) -> int:
        """Cut the completion to exactly its first `pos` characters; return how many tokens were dropped.

        Tokens whose text lies wholly within `pos` are kept; if the cut falls inside a token
        (a token holding a fence and the next line's start, say), the remainder up to `pos`
        is re-encoded, so the text is exact and the trajectory stays its tokens.
        """
        source = st.text.text
        if pos >= len(source):
            return 0
        keep = st.text.tokens_within(pos)
        dropped = st.traj.truncate(st.prompt_len + keep)
        st.text.truncate(keep)
        if len(st.text.text) < pos:
            self._append(
                st, self.tokenizer.encode(source[len(st.text.text) : pos], add_special_tokens=False), SegmentKind.model
            )
        self._after_cut(st)
        return len(dropped)

    def _after_cut(self, st: _State) -> None:
        st.emitted = min(st.emitted, len(st.text.text))
        st.emit_in_think = self._in_think(st, st.emitted)

    def _new_watch(self, st: _State) -> None:
        """Watch the current round from its start (a new round, or one a backtrack shortened)."""
        if not st.tools_on:
            st.watch = None
            return
        st.watch = FenceWatch(st.languages, start=st.round_start)
        st.watch.feed(st.text.text)  # the kept text of a shortened round holds no event: it ends before the block

    def _in_think(self, st: _State, upto: int) -> bool:
        """Whether the completion's first `upto` characters leave the model inside <think>."""
        if not self.reasoning_model:
            return False
        head = st.text.text[:upto]
        o, c = head.rfind(THINK_OPEN), head.rfind(THINK_CLOSE)
        if o < 0 and c < 0:
            return st.prompt_in_think
        return o > c

    def _think_tokens(self, st: _State) -> int | None:
        """Tokens the thinking budget has used so far, or None when thinking is over.

        Thinking is over once </think> follows the last <think> (in the completion, or in the
        prompt when the template closed the block: Qwen3 with thinking off). Until the model
        opens <think> itself, the tokens so far count (it may be about to).
        """
        if not self.reasoning_model:
            return None
        text = st.text.text
        c = text.rfind(THINK_CLOSE)
        o = text.find(THINK_OPEN, c + 1 if c >= 0 else 0)  # the block opened first counts, not a re-opening
        if o < 0 and c < 0:
            return None if st.prompt_think_closed else len(st.text)
        if o < 0:
            return None
        return len(st.text) - st.text.tokens_within(o + len(THINK_OPEN))

    def _pieces(self, text: str, in_think: bool) -> tuple[list[tuple[str, str, bool]], bool]:
        """Split text at think tags: [(piece, channel, is_markup)] and the state after it."""
        if not self.reasoning_model:
            return ([(text, "answer", False)] if text else []), False
        out: list[tuple[str, str, bool]] = []
        while text:
            tag = THINK_CLOSE if in_think else THINK_OPEN
            idx = text.find(tag)
            if idx < 0:
                out.append((text, "reasoning" if in_think else "answer", False))
                break
            if idx:
                out.append((text[:idx], "reasoning" if in_think else "answer", False))
            out.append((tag, "reasoning", True))
            in_think = not in_think
            text = text[idx + len(tag) :]
        return out, in_think

    def _emit(
        self, st: _State, upto: int, retractable: bool, source: str = "model", constrained: bool = False
    ) -> list[TextDelta]:
        if upto <= st.emitted:
            return []
        pieces, st.emit_in_think = self._pieces(st.text.text[st.emitted : upto], st.emit_in_think)
        st.emitted = upto
        return [
            TextDelta(
                text=t,
                channel=ch,
                markup=m,
                retractable=retractable and source == "model",  # type: ignore[arg-type]
                source=source,
                constrained=constrained,
            )
            for t, ch, m in pieces
        ]  # type: ignore[arg-type]

    def _safe_end(self, st: _State, holds: Sequence[str]) -> int:
        """How far the text may be streamed now: not into a line that may become a fence, nor
        into a prefix of a stop string or think tag that may still complete."""
        text = st.text.text
        end = len(text)
        if st.tools_on:
            line = max(st.round_start, text.rfind("\n") + 1)
            head = text[line:].lstrip(" \t")
            if line < end and (not head or head.startswith("`")):
                end = line
        for s in holds:
            for k in range(min(len(s), end), 0, -1):
                if text.endswith(s[:k], 0, end):
                    end -= k
                    break
        return max(end, st.emitted)

    def _retractable(self, st: _State, cfg: ThorConfig) -> bool:
        """Could a failure still take back text of this round (so a plain client must not see it yet)?"""
        sc = cfg.self_correction
        if cfg.stop_after_execution or not (st.tools_on and not st.cut and sc.enabled and st.attempt < sc.max_retries):
            return False
        needed = 2 if sc.retries_consume_budget else 1  # this call and its resample
        return st.tool_budget_used + needed <= cfg.max_tool_calls

    # --- one trajectory -----------------------------------------------------------------

    async def _run(
        self,
        prompt: list[int],
        cfg: ThorConfig,
        sampling: SamplingOptions,
        sample: int,
        rid: str,
        include_trajectory: bool,
        final: FinalAnswer | None = None,
    ) -> AsyncIterator[Event]:
        tail = self.tokenizer.decode(prompt[-16:], skip_special_tokens=False) if self.reasoning_model else ""
        st = _State(
            traj=Trajectory.from_prompt(prompt, record_logprobs=sampling.logprobs),
            text=TokenText(self.tokenizer, skip_special_tokens=sampling.skip_special_tokens),
            prompt_len=len(prompt),
            prompt_in_think=tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE),
            prompt_think_closed=tail.rfind(THINK_CLOSE) > tail.rfind(THINK_OPEN),
            tools_on=cfg.max_tool_calls > 0 or cfg.on_tool_budget == "stop",
            languages=cfg.code_languages,
        )
        st.emit_in_think = st.prompt_in_think
        if cfg.repetition is not None:
            st.loop = RepetitionDetector(cfg.repetition)
        self._new_watch(st)
        eos = self.backend.eos_token_ids
        max_len = self.backend.max_model_len
        budget = sampling.max_tokens if sampling.max_tokens is not None else max_len - len(prompt)
        cap = cfg.max_generated_tokens or GENERATION_CAP_FACTOR * budget
        sc = cfg.self_correction
        holds = list(sampling.stop) + ([THINK_OPEN, THINK_CLOSE] if self.reasoning_model else [])

        def emit(ev: Event) -> Event:
            ev.sample = sample  # type: ignore[union-attr]
            return ev

        finish = FinishReason.stop
        while final is None or st.tools_on:  # tools off and a constrained answer: that answer is all
            remaining = budget - len(st.text)
            room = max_len - len(st.traj)
            if remaining <= 0:
                finish = FinishReason.length
                break
            if room <= 0:
                finish = FinishReason.context_length
                break
            if st.counters.generated >= cap:
                finish = FinishReason.generation_cap
                break
            # the tightest limit on this request, and the finish reason if the request runs into it
            req_max, bound = min(
                (remaining, FinishReason.length),
                (room, FinishReason.context_length),
                (cap - st.counters.generated, FinishReason.generation_cap),
                key=lambda x: x[0],
            )
            think_limited = False
            if cfg.thinking_budget is not None and not st.cut:
                used = self._think_tokens(st)
                if used is not None:
                    think_room = cfg.thinking_budget - used
                    if think_room <= 0:
                        for ev in self._cut_thinking(st, cfg):
                            yield emit(ev)
                        continue
                    if think_room < req_max:
                        req_max, think_limited = think_room, True

            if st.loop is not None and self._sync_loop(st):
                finish = FinishReason.repetition  # tokens the last request ended with closed a loop
                break

            stops = list(sampling.stop)
            if st.tools_on:
                stops += [FENCE_STOP, OUTPUT_STOP]
            temperature = sampling.temperature
            if st.attempt > 0 and temperature == 0:
                temperature = sc.retry_temperature
            seed = None if sampling.seed is None else sampling.seed + 7919 * st.counters.engine_requests
            if seed is None and st.attempt > 0:
                # resamples of an unseeded request still get a seed derived from its id: reproducible logs
                seed = zlib.crc32(f"{rid}-{sample}-{st.counters.engine_requests}".encode())
            params = GenParams(
                max_tokens=req_max,
                temperature=temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=seed,
                stop=tuple(stops),
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                min_p=sampling.min_p,
                min_tokens=max(0, sampling.min_tokens - len(st.text)),
                logit_bias=dict(sampling.logit_bias) or None,
                stop_token_ids=sampling.stop_token_ids,
                ignore_eos=sampling.ignore_eos,
                skip_special_tokens=sampling.skip_special_tokens,
                logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's own log-probability only
            )
            req_id = f"{rid}-{sample}-{st.counters.engine_requests}"
            st.counters.engine_requests += 1
            request_prompt_len = len(st.traj)
            retractable = self._retractable(st, cfg)
            fence: FenceEvent | None = None
            last: GenChunk | None = None
            looped = False
            async with contextlib.aclosing(self.backend.generate(st.traj.token_ids, params, req_id)) as gen:
                async for chunk in gen:
                    last = chunk
                    self._take(st, chunk, request_prompt_len, sampling.logprobs)
                    if st.watch is not None and (fence := st.watch.feed(st.text.text)) is not None:
                        break  # leaving the block aborts the engine request: nothing after the fence is kept
                    for ev in self._emit(st, self._safe_end(st, holds), retractable):
                        yield emit(ev)
                    if st.loop is not None and chunk.token_ids and not chunk.finished:
                        # a request the engine ended itself ends as it says; the next sync sees its tokens
                        st.loop_fed += len(chunk.token_ids)
                        if st.loop.feed(chunk.token_ids):
                            looped = True
                            break  # leaving the block aborts the engine request; the text so far is kept

            if looped:
                finish = FinishReason.repetition
                break
            if fence is None:
                if last is None or not last.finished or last.finish_reason == "abort":
                    finish = FinishReason.aborted
                    break
                if last.finish_reason == "length":
                    if think_limited:
                        continue  # the thinking budget is spent: cut it on the next turn
                    for ev in self._emit(st, len(st.text.text), retractable):
                        yield emit(ev)
                    finish = bound
                    break
                if last.stop_reason is not None and last.stop_reason in sampling.stop:
                    st.stop_string = str(last.stop_reason)
                    text = st.text.text
                    at = text.rfind(str(last.stop_reason), st.round_start)
                    if at >= 0:
                        cut_at = at + len(str(last.stop_reason)) if sampling.include_stop_str_in_output else at
                        st.counters.discarded += self._truncate_chars(st, cut_at)
                    for ev in self._emit(st, len(st.text.text), False):
                        yield emit(ev)
                    finish = FinishReason.stop
                    break
                if isinstance(last.stop_reason, int):  # one of the request's stop_token_ids
                    for ev in self._emit(st, len(st.text.text), False):
                        yield emit(ev)
                    finish = FinishReason.stop
                    break
                if last.stop_reason in (FENCE_STOP, OUTPUT_STOP):
                    continue  # a non-code block closed (FenceWatch saw no event): keep generating
                # EOS: a code block closed right before it (no newline after the fence) still runs
                fence = self._fence_before_eos(st, cfg, eos)
                if fence is None:
                    for ev in self._emit(st, len(st.text.text), False):
                        yield emit(ev)
                    finish = FinishReason.stop
                    break

            ended: FinishReason | None = None
            async for ev in self._tool_round(st, cfg, fence, retractable):
                if isinstance(ev, FinishReason):
                    ended = ev
                else:
                    yield emit(ev)
            if ended is not None:
                finish = ended
                break

        for ev in self._emit(st, len(st.text.text), False):
            yield emit(ev)
        if final is not None and finish is FinishReason.stop and st.stop_string not in final.not_after:
            async for item in self._answer_phase(st, final, sampling, budget, f"{rid}-{sample}"):
                if isinstance(item, FinishReason):
                    finish = item
                else:
                    yield emit(item)
        yield emit(self._final(st, finish, include_trajectory))

    async def _answer_phase(
        self, st: _State, final: FinalAnswer, sampling: SamplingOptions, budget: int, rid: str
    ) -> AsyncIterator[Event | FinishReason]:
        """Phase 2: the model's end-of-turn token dropped, the instruction injected (and committed),
        then one engine request under the constraint, within what is left of the token budget and
        the context. Yields its text as answer deltas, then a finish reason other than stop, if any."""
        eos = self.backend.eos_token_ids
        if len(st.text) and st.traj.token_ids[-1] in eos and len(st.traj) - 1 >= st.traj.protected:
            st.traj.truncate(len(st.traj) - 1)  # the answer continues the model's turn
            st.text.truncate(len(st.text) - 1)
            st.counters.discarded += 1
            self._after_cut(st)
        if final.instruction and st.tools_on:  # tools off: plain constrained generation, as vLLM's
            instruction = final.instruction
            if self.reasoning_model and self._in_think(st, len(st.text.text)):
                instruction = "\n" + THINK_CLOSE + instruction  # the answer is given outside the thinking
            self._append(st, self.tokenizer.encode(instruction, add_special_tokens=False), SegmentKind.injected)
            for ev in self._emit(st, len(st.text.text), False, source="injected"):
                yield ev
        st.traj.protect()
        remaining, room = budget - len(st.text), self.backend.max_model_len - len(st.traj)
        if remaining <= 0 or room <= 0:
            yield FinishReason.length if remaining <= room else FinishReason.context_length
            return
        params = GenParams(
            max_tokens=min(remaining, room),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=None if sampling.seed is None else sampling.seed + 7919 * st.counters.engine_requests,
            structured_outputs=dict(final.structured_outputs),
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            min_p=sampling.min_p,
            logit_bias=dict(sampling.logit_bias) or None,
            skip_special_tokens=sampling.skip_special_tokens,
            logprobs=0 if sampling.logprobs else None,
        )
        req_id = f"{rid}-{st.counters.engine_requests}"
        st.counters.engine_requests += 1
        request_prompt_len = len(st.traj)
        last: GenChunk | None = None
        async with contextlib.aclosing(self.backend.generate(st.traj.token_ids, params, req_id)) as gen:
            async for chunk in gen:
                last = chunk
                self._take(st, chunk, request_prompt_len, sampling.logprobs)
                for ev in self._emit(st, len(st.text.text), False, constrained=True):
                    yield ev
        if last is None or not last.finished or last.finish_reason == "abort":
            yield FinishReason.aborted
        elif last.finish_reason == "length":
            yield FinishReason.length if remaining <= room else FinishReason.context_length

    def _sync_loop(self, st: _State) -> bool:
        """Bring the loop detector up to the kept trajectory's model tokens; True if they end in a loop.

        The detector sees the tokens the model wrote into the trajectory as it stands, in order:
        tool outputs and injected text are left out (an output cannot make a loop, and text the
        model repeats across tool rounds still does), discarded attempts are forgotten. Tokens
        are fed as they arrive; before each engine request, tokens appended without it (a round's
        last chunk, a re-encoded cut) are fed, and after any truncation (a fence or stop-string
        cut, a backtrack) the detector is rebuilt from the kept tail (at most `window` tokens).
        """
        assert st.loop is not None
        model = st.traj.count(SegmentKind.model)
        if st.traj.truncations != st.loop_cuts or model < st.loop_fed:
            st.loop.reset(st.traj.tail(SegmentKind.model, st.loop.window))
        elif model > st.loop_fed:
            st.loop.feed(st.traj.tail(SegmentKind.model, model - st.loop_fed))
        st.loop_fed, st.loop_cuts = model, st.traj.truncations
        return st.loop.tripped is not None

    def _fence_before_eos(self, st: _State, cfg: ThorConfig, eos: frozenset[int]) -> FenceEvent | None:
        if not st.tools_on:
            return None
        start = st.round_start
        block = trailing_block(st.text.text[start:])
        if block is None or not is_code_language(block.language, cfg.code_languages):
            return None
        if st.text.ids and st.text.ids[-1] in eos:
            # the model closed its block and ended: drop the EOS, run the block, let it go on
            st.traj.truncate(len(st.traj) - 1)
            st.text.truncate(len(st.text) - 1)
        shifted = FencedBlock(block.language, block.code, block.start + start, block.end + start, True)
        return FenceEvent("code_closed", len(st.text.text), shifted)

    def _cut_thinking(self, st: _State, cfg: ThorConfig) -> list[Event]:
        events: list[Event] = list(self._emit(st, len(st.text.text), False))
        self._append(st, self.tokenizer.encode(cfg.thinking_cut_text, add_special_tokens=False), SegmentKind.injected)
        st.traj.protect()
        st.cut = True
        self._new_watch(st)
        events += self._emit(st, len(st.text.text), False, source="injected")
        return events

    async def _tool_round(
        self, st: _State, cfg: ThorConfig, fence: FenceEvent, retractable: bool
    ) -> AsyncIterator[Event | FinishReason]:
        """The round ended at a fence event: cut what follows it, then run, refuse or end."""
        sc = cfg.self_correction
        st.counters.discarded += self._truncate_chars(st, fence.position)
        block = fence.block
        if fence.kind == "output_opened" and block is not None and not st.text.text.endswith("```\n"):
            # "```output" where the closing fence belonged: close the block for the model
            lead = "" if st.text.text.endswith("\n") else "\n"
            self._append(st, self.tokenizer.encode(lead + "```\n", add_special_tokens=False), SegmentKind.injected)
        for ev in self._emit(st, len(st.text.text), retractable):
            yield ev
        if block is None or not is_code_language(block.language, cfg.code_languages):
            # the model opened an output block with no code to run: its invented output is gone; stop here
            yield FinishReason.stop
            return
        if st.cut or st.tool_budget_used >= cfg.max_tool_calls:
            if cfg.on_tool_budget == "stop" and not st.cut:
                yield FinishReason.tool_budget
                return
            yield CodeBlock(
                call=st.call_index,
                attempt=0,
                execution=st.executions,
                language=block.language,
                code=block.code,
                fence_token=self._fence_token(st, block),
            )
            yield ToolCall(
                call=st.call_index,
                attempt=0,
                execution=st.executions,
                ok=False,
                outcome="not_executed",
                exit_code=None,
                stdout="",
                stderr="",
                observation=cfg.not_executed_message,
                duration_s=0.0,
                committed=True,
            )
            st.stats.not_executed += 1
            st.call_index += 1
            for ev in self._commit_observation(st, cfg, cfg.not_executed_message):
                yield ev
            return

        call, attempt, execution = st.call_index, st.attempt, st.executions
        st.executions += 1
        yield CodeBlock(
            call=call,
            attempt=attempt,
            execution=execution,
            language=block.language,
            code=block.code,
            fence_token=self._fence_token(st, block),
        )
        result = await self.executor.execute(
            block.code,
            timeout_s=cfg.observation.timeout_s,
            echo_last_expression=cfg.observation.profile == "notebook",
        )
        obs = judge(result.exit_code, result.stdout, result.stderr, cfg.observation, outcome=result.outcome)
        st.stats.calls += 1
        st.stats.duration_s += result.duration_s
        if obs.ok:
            st.stats.ok += 1
        else:
            st.stats.failed += 1
        # A resample must itself be able to run: with retries charged to the budget, this call and
        # the resample need two units; otherwise the error is committed (never a retry whose block
        # could not execute, which would let the model invent its output).
        affordable = st.tool_budget_used + (2 if sc.retries_consume_budget else 1) <= cfg.max_tool_calls
        # a sandbox failure is not the code's fault: resampling the code would not help; and with
        # stop_after_execution the trajectory ends at this block whatever its outcome
        retry = (
            not obs.ok
            and result.outcome != "sandbox_error"
            and sc.enabled
            and attempt < sc.max_retries
            and affordable
            and not cfg.stop_after_execution
        )
        if not retry or sc.retries_consume_budget:
            st.tool_budget_used += 1
        yield ToolCall(
            call=call,
            attempt=attempt,
            execution=execution,
            ok=obs.ok,
            outcome=result.outcome,
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            observation=obs.text,
            duration_s=result.duration_s,
            cached=result.cached,
            committed=not retry,
        )
        if retry:
            yield self._backtrack(st, cfg, block, call, reason=result.outcome)
            return
        st.attempt = 0
        st.call_index += 1
        st.stats.committed += 1
        if cfg.stop_after_execution:
            # step-level RL: the trajectory ends with the model's closing fence, its output never appended
            yield FinishReason.tool_executed
            return
        for ev in self._commit_observation(st, cfg, obs.text):
            yield ev
        if not obs.ok and cfg.stop_on_tool_error:
            yield FinishReason.tool_error

    def _commit_observation(self, st: _State, cfg: ThorConfig, observation: str) -> list[TextDelta]:
        text = injection(observation, st.text.text.endswith("\n"))
        # the tool's output is plain text: a control token it prints (<|im_end|>) stays text
        self._append(st, encode_plain(self.tokenizer, text), SegmentKind.observation)
        st.traj.protect()
        self._new_watch(st)
        return self._emit(st, len(st.text.text), False, source="observation")

    def _backtrack(self, st: _State, cfg: ThorConfig, block: FencedBlock, call: int, reason: str) -> Backtrack:
        sc = cfg.self_correction
        base = st.traj.protected - st.prompt_len  # first token of this round (completion index)
        start = st.round_start
        block_tok = st.text.tokens_within(block.start)
        if sc.mode == "tokens":
            keep = max(base, block_tok - sc.backtrack_tokens)
        else:
            # back to the start of the reasoning step that led to the code: skip the blank lines
            # between it and the fence, then go to the paragraph break before it
            step = st.text.text[start : block.start].rstrip()
            boundary = step.rfind("\n\n")
            keep = min(st.text.tokens_within(start + boundary + 2) if boundary >= 0 else base, block_tok)
        emitted = st.emitted
        dropped = st.traj.truncate(st.prompt_len + keep)
        st.text.truncate(keep)
        self._after_cut(st)
        self._new_watch(st)
        st.counters.discarded += len(dropped)
        st.stats.backtracks += 1
        st.attempt += 1
        return Backtrack(
            call=call,
            attempt=st.attempt,
            reason=reason,
            mode=sc.mode,
            tokens_dropped=len(dropped),
            chars_retracted=emitted - st.emitted,
        )

    def _final(self, st: _State, finish: FinishReason, include_trajectory: bool) -> Final:
        traj, text = st.traj, st.text.text
        start = st.round_start
        pieces, _ = self._pieces(text[start:], self._in_think(st, start))
        answer_text = "".join(p for p, ch, markup in pieces if ch == "answer" and not markup).lstrip()
        model_text = "".join(
            text[st.text.offset(a - st.prompt_len) : st.text.offset(b - st.prompt_len)]
            for a, b, kind in traj.spans()
            if kind is SegmentKind.model
        )
        answer = extract_boxed(answer_text) or extract_boxed(_prose(model_text))
        answer_tokens = len(st.text) - st.text.tokens_within(len(text) - len(answer_text)) if answer_text else 0
        c = st.counters
        usage = Usage(
            prompt_tokens=st.prompt_len,
            completion_tokens=len(st.text),
            model_tokens=traj.count(SegmentKind.model),
            answer_tokens=answer_tokens,
            observation_tokens=traj.count(SegmentKind.observation),
            injected_tokens=traj.count(SegmentKind.injected),
            discarded_tokens=c.discarded,
            generated_tokens=c.generated,
            prompt_cached_tokens=c.prompt_cached,
            cached_prompt_tokens=c.cached_prompt,
            prefilled_prompt_tokens=c.prefilled_prompt,
            engine_requests=c.engine_requests,
        )
        return Final(
            text=text,
            answer_text=answer_text,
            answer=answer,
            finish_reason=finish,
            usage=usage,
            tools=st.stats,
            trajectory=traj.to_dict() if include_trajectory else None,
        )


def _sampled_logprobs(chunk: GenChunk) -> list[float | None]:
    """The log-probability of each sampled token of a chunk, from the engine's per-token
    {token id: Logprob (vLLM, `.logprob`) or float} dicts (requested with `GenParams.logprobs=0`)."""
    entries = chunk.logprobs
    if entries is None or len(entries) != len(chunk.token_ids):
        got = "none" if entries is None else f"{len(entries)} entries"
        raise RuntimeError(
            f"the engine returned {got} of log-probabilities for {len(chunk.token_ids)} tokens although "
            "SamplingOptions.logprobs asked for them (GenParams.logprobs=0): the backend must return one "
            "{token id: logprob} entry per generated token"
        )
    out: list[float | None] = []
    for tid, entry in zip(chunk.token_ids, entries, strict=True):
        value = entry.get(tid) if entry else None
        if value is None:
            raise RuntimeError(
                f"the engine's log-probabilities for a generated token lack the sampled token {tid}: "
                "the backend must include the sampled token in each entry (vLLM does for logprobs=0)"
            )
        out.append(float(getattr(value, "logprob", value)))
    return out


def _prose(text: str) -> str:
    """Text without its fenced blocks (code is not where an answer is stated)."""
    out, pos = [], 0
    for block in find_blocks(text):
        out.append(text[pos : block.start])
        pos = block.end
    out.append(text[pos:])
    return "".join(out)


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    """Drain an event stream into a list (for scripts and tests)."""
    return [ev async for ev in events]


def finals(events: list[Event]) -> list[Final]:
    out = [e for e in events if isinstance(e, Final)]
    return sorted(out, key=lambda f: f.sample)


__all__ = ["FENCE_STOP", "OUTPUT_STOP", "ThorDecoder", "collect", "finals"]
