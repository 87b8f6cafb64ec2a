"""TIRGen's two models over plain `/v1/completions`: the actor, and the critic with the real tool loop.

Owns:

- `Actor`: step-wise text completion of the chat-templated actor prompt plus the
  solution so far, so the actor can continue from a prefix the critic rewrote. Its
  steps stop at an output fence (```` ```output ````): the actor has no tool, so an
  output block it starts is invented (generate.py decides what the step becomes).
- `Critic`: one fragment's rewrite with its code really executed: the critic's text is
  cut after each closed python block, the sandbox runs the block with the decoder's
  settings and the observation is judged by the training rules RL's rollouts use too
  (``thor_engine.config.training_observation``) and injected exactly as the decoder injects it
  (``thor_engine.observation.judge`` / ``injection``), so whatever the critic would
  have predicted is never kept (its completions stop at an output fence, and its text is
  cut after each closed block); a failed call ends the rewrite.

Both need only a text completions endpoint (vLLM, our server, most hosted completions
APIs) and the model's tokenizer here for its chat template: the prompt text is rendered
locally and continued, which a chat API cannot do.

Does not own: the prompts (prompts.py), assembling a sample (generate.py), the sandbox
service itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from trainer.evaluate.client_loop import resolve_tokenizer
from trainer.evaluate.remote_backend import _local_model_dir, _model_entry, base_url, load_tokenizer
from trainer.evaluate.targets import TargetError

from .filters import OUTPUT_FENCE
from .prompts import actor_messages, critic_messages
from .sample import SegmentText

__all__ = [
    "Actor",
    "Completion",
    "CompletionsClient",
    "Critic",
    "CriticRewrite",
    "EndpointError",
    "TargetError",
    "critic_lead",
]


class EndpointError(RuntimeError):
    """One request failed (a 5xx, a malformed answer): the sample fails, the run goes on."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    tokens: int
    stop_reason: str | int | None = None  # the stop string (or token id) that ended it, where the endpoint says

    @property
    def at_output_fence(self) -> bool:
        """It stopped where the model began an output block (an endpoint that reports no `stop_reason`, such as
        a hosted completions API, reads as an ordinary end)."""
        return self.finish_reason == "stop" and self.stop_reason == OUTPUT_FENCE


class CompletionsClient:
    """One model on a text completions endpoint, with its tokenizer here (for its chat template)."""

    def __init__(self, client: httpx.AsyncClient, model: str, tokenizer: Any) -> None:
        self.client = client
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, url: str, *, model: str | None, tokenizer: str | None, api_key: str | None = None, timeout_s: float = 900
    ) -> AsyncIterator[Self]:
        """Connect and check the model exists; raises TargetError (unreachable, unknown model, no tokenizer)."""
        base = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(
            base_url=base, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10)
        ) as client:
            entry = await _model_entry(client, base, model)
            tok_path = resolve_tokenizer(tokenizer) or _model_dir(entry, base)
            tok, _ = load_tokenizer(tok_path)
            yield cls(client, str(entry["id"]), tok)

    async def step(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        stop: tuple[str, ...] = (OUTPUT_FENCE,),
    ) -> Completion:
        """One completion of `prompt`; by default it stops where the model begins an output block (only the
        tool loop writes those)."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        if stop:
            body["stop"] = list(stop)
        where = f"{self.client.base_url}/v1/completions"
        try:
            r = await self.client.post("/v1/completions", json=body)
        except httpx.TransportError as exc:
            raise TargetError(f"endpoint {where} stopped answering: {type(exc).__name__}: {exc}") from exc
        if r.status_code in (401, 403, 404):
            raise TargetError(f"endpoint {where} answered {r.status_code}: {r.text[:300]}")
        if r.status_code != 200:
            raise EndpointError(f"endpoint {where} answered {r.status_code}: {r.text[:300]}")
        try:
            choice = r.json()["choices"][0]
            usage = r.json().get("usage") or {}
            return Completion(
                text=str(choice["text"]),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                tokens=int(usage.get("completion_tokens") or 0),
                stop_reason=choice.get("stop_reason"),
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EndpointError(f"endpoint {where} did not answer an OpenAI completion: {r.text[:200]}") from exc


class Actor(CompletionsClient):
    """The actor: step-wise reasoning continued from any prefix."""

    def prompt(self, problem: str) -> str:
        """The actor's chat-templated prompt, ready for the assistant's text."""
        return self.tokenizer.apply_chat_template(actor_messages(problem), tokenize=False, add_generation_prompt=True)


def _model_dir(entry: dict[str, Any], base: str) -> str:
    try:
        return _local_model_dir(entry, base)
    except TargetError as exc:
        raise TargetError(
            f"endpoint {base} serves {entry['id']!r}, which is not a model directory here: pass --actor-tokenizer / "
            "--critic-tokenizer (the model's directory or preset) for its chat template"
        ) from exc


@dataclass
class CriticRewrite:
    """The critic's rewrite of one fragment: text segments (model / observation), and its tool calls."""

    segments: list[SegmentText]
    calls: int
    failed: int
    finish_reason: str  # "stop", "length" (cut by its token budget) or "tool_error"
    observations: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


class Critic:
    """The critic model on a text completions endpoint, with the real tool loop run here.

    The critic's turn is prefilled with the fragment's first line (the actor's own plan
    sentence, when the fragment has more than one line and that line states no computed
    value: `critic_lead`) and an opened ```` ```python ````
    fence, so even a small critic writes code rather than a paraphrase. Its completions
    stop at an output fence. Each time its
    text holds a closed python block, the text is cut after that block's closing fence
    (whatever it wrote after it, an invented output included, is dropped), the code runs
    in the sandbox with the decoder's settings, the observation is judged and injected as
    the decoder does (``thor_engine.observation``), and the critic continues from there.
    A failed call ends the rewrite (the sample is dropped by the caller). A line with the
    final ``\\boxed`` answer and what follows it are cut: the actor writes the ending.
    """

    def __init__(
        self, completions: CompletionsClient, executor: Any, *, max_calls: int, observation: Any = None
    ) -> None:
        from thor_engine.config import training_observation

        self.completions = completions
        self.model = completions.model
        self.executor = executor
        self.max_calls = max_calls
        # the rules RL rolls out with (one setting, thor_engine.config.TRAINING_OBSERVATION_PROFILE)
        self.observation = observation or training_observation()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        model: str | None,
        tokenizer: str | None,
        api_key: str | None = None,
        sandbox_url: str | None = None,
        sandbox_pool: int = 4,
        max_calls: int = 4,
    ) -> AsyncIterator[Critic]:
        from thor_engine.cli.local_sandbox import LocalSandboxError, sandbox_at
        from thor_engine.tools import SandboxExecutor, SandboxPolicy
        from thor_sandbox.client import SandboxClient

        async with contextlib.AsyncExitStack() as stack:
            completions = await stack.enter_async_context(
                CompletionsClient.open(url, model=model, tokenizer=tokenizer, api_key=api_key)
            )
            try:
                sandbox = await stack.enter_async_context(sandbox_at(sandbox_url, pool_size=sandbox_pool))
            except LocalSandboxError as exc:
                raise TargetError(f"no sandbox: {exc}") from exc
            client = await stack.enter_async_context(SandboxClient(sandbox))
            executor = SandboxExecutor(client, SandboxPolicy(max_concurrent_per_request=1))
            yield cls(completions, executor, max_calls=max_calls)

    async def rewrite(
        self, problem: str, solution_so_far: str, step: str, *, max_tokens: int, temperature: float, seed: int
    ) -> CriticRewrite:
        """One fragment through the tool loop. Raises TargetError when the endpoint stops serving."""
        from thor_engine.codeblocks import find_blocks, is_code_language
        from thor_engine.observation import injection, judge

        tok = self.completions.tokenizer
        prompt = tok.apply_chat_template(
            critic_messages(problem, solution_so_far, step), tokenize=False, add_generation_prompt=True
        )
        lead = critic_lead(problem, solution_so_far, step)
        segments: list[SegmentText] = []
        current = lead + "```python\n"  # model text since the last observation
        calls = failed = 0
        observations: list[str] = []
        budget = max_tokens
        finish = "stop"
        langs = ("python", "py", "python3")
        while True:
            done_text = "".join(s.text for s in segments)
            r = await self.completions.step(
                prompt + done_text + current, max_tokens=budget, temperature=temperature, top_p=1.0, seed=seed + calls
            )
            budget -= max(r.tokens, 1)
            text = current + r.text
            block = next((b for b in find_blocks(text) if b.closed and is_code_language(b.language, langs)), None)
            if block is None:
                current = text
                finish = r.finish_reason if r.finish_reason == "length" else "stop"
                break
            current = text[: block.end] + "\n"
            result = await self.executor.execute(
                block.code,
                timeout_s=self.observation.timeout_s,
                echo_last_expression=self.observation.profile == "notebook",
            )
            obs = judge(result.exit_code, result.stdout, result.stderr, self.observation, outcome=result.outcome)
            calls += 1
            observations.append(obs.text)
            segments.append(SegmentText(kind="model", text=current))
            segments.append(SegmentText(kind="observation", text=injection(obs.text, True)))
            current = ""
            if not obs.ok:
                failed += 1
                finish = "tool_error"
                break
            if calls >= self.max_calls or budget <= 0:
                break
        answer_at = current.find("\\boxed")
        if answer_at >= 0:
            current = current[: current.rfind("\n", 0, answer_at) + 1]
        current = _without_trailing_fences(current)
        if current:
            segments.append(SegmentText(kind="model", text=current))
        _strip_end_token(segments, tok)
        return CriticRewrite(
            segments=[s for s in segments if s.text],
            calls=calls,
            failed=failed,
            finish_reason=finish,
            observations=observations,
        )


_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_OUTPUT_BODY = re.compile(r"```output[ \t]*\r?\n(.*?)```", re.DOTALL)


def _numbers(text: str) -> set[str]:
    """The numbers written in `text`, normalised (no thousands separators, no trailing ``.0``)."""
    out = set()
    for n in _NUMBER.findall(text):
        n = n.replace(",", "")
        out.add(n.rstrip("0").rstrip(".") if "." in n else n)
    return out


def critic_lead(problem: str, solution_so_far: str, step: str) -> str:
    """The line the critic's turn is prefilled with: the step's first line (the actor's plan sentence), when the
    step has more than one line and that line states no computed value. A line with an inline computation
    (``12 * 7 = 84``) or a number that is neither in the problem nor in a real output so far states a result the
    code has not computed yet: carried over, it would sit before the code that computes it (and could be
    wrong), so the critic writes its own first line instead."""
    from .filters import inline_results

    lines = step.strip().split("\n")
    if len(lines) < 2:
        return ""
    first = lines[0].rstrip()
    known = _numbers(problem).union(*(_numbers(o) for o in _OUTPUT_BODY.findall(solution_so_far)))
    if inline_results(first) or not _numbers(first) <= known:
        return ""
    return first + "\n"


def _without_trailing_fences(text: str) -> str:
    """`text` without a trailing fence that closes nothing: after the answer line is cut, a stray fence
    line would open a block that swallows the actor's ending."""
    from thor_engine.codeblocks import find_blocks

    blocks = find_blocks(text)
    if blocks and not blocks[-1].closed and not blocks[-1].language and not text[blocks[-1].start :].strip("` \t\n"):
        return text[: blocks[-1].start]
    return text


def _strip_end_token(segments: list[SegmentText], tokenizer: Any) -> None:
    """Drop the critic's end-of-turn token: its turn ends, the sample's text goes on."""
    ends = [t for t in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>") if t]
    while segments and segments[-1].kind == "model":
        text = segments[-1].text
        for end in ends:
            if text.endswith(end):
                text = text[: -len(end)]
        if text == segments[-1].text:
            break
        segments[-1] = SegmentText(kind="model", text=text)
