"""TIRGen's multi-stage filters: which generated samples become training data, and the funnel.

Owns: `FilterConfig` (every threshold, each documented), one filter function per stage
(``(sample, cfg) -> str | None``: None passes, a string is the short reason for rejecting),
the set-level stages (one sample per problem, the single-call down-sample), `apply_filters`
(samples in, kept + rejected + funnel out), `code_invocation_ratio`, and the funnel's
Markdown table (`format_funnel`) and bar chart (`plot_funnel`, ``funnel.png``).

Stages, in order (a sample is rejected by the first stage it fails; each name is stable and
is what the funnel, `FilterConfig.disabled` and the rejection records use):

    correct, code_passed, length, boxed, dollars, fences, real_outputs, result_before_code,
    think, has_code, code_quality, repetition, dedup, single_call_downsample

Does not own: generating samples (generate.py), grading answers (the generator sets
``TirSample.correct`` with ``thor_engine.answer``), the sample schema (sample.py) or writing
the dataset and summary files (the TIRGen command).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from thor_engine.answer.extraction import extract_boxed
from thor_engine.codeblocks import CodeBlock, find_blocks, is_code_language

from .sample import TirSample

__all__ = [
    "ALL_STAGES",
    "SAMPLE_FILTERS",
    "SET_STAGES",
    "FilterConfig",
    "FilterResult",
    "FunnelStage",
    "Rejection",
    "apply_filters",
    "code_invocation_ratio",
    "filter_boxed",
    "filter_code_passed",
    "filter_code_quality",
    "filter_correct",
    "filter_dollars",
    "filter_fences",
    "filter_has_code",
    "filter_length",
    "filter_real_outputs",
    "filter_repetition",
    "filter_result_before_code",
    "filter_think",
    "find_repetition",
    "format_funnel",
    "inline_results",
    "observation_is_error",
    "plot_funnel",
    "real_code_lines",
]


class FilterConfig(BaseModel):
    """Every threshold of the filters. Defaults suit small models (0.5B-1.5B) writing GSM8K/MATH-level
    solutions; each field says why its default is what it is."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    min_chars: int = Field(
        default=100,
        ge=0,
        description="Fewest characters of completion (model text + observations). A sentence of reasoning, a "
        "code block, its output and a boxed answer take at least about 100 characters; shorter completions are "
        "answer-only or cut off.",
    )
    max_chars: int = Field(
        default=16_000,
        ge=1,
        description="Most characters of completion. About 4,000 tokens at Qwen's ~4 characters per token: "
        "small models that run longer are usually looping, and SFT on CPU keeps sequences short.",
    )
    min_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Fewest completion tokens; checked only when `count_tokens` is set (None: no lower bound).",
    )
    max_tokens: int | None = Field(
        default=4096,
        ge=1,
        description="Most completion tokens; checked only when `count_tokens` is set. 4096 matches the reference "
        "actor step and a small model's useful generation length.",
    )
    count_tokens: Callable[[str], int] | None = Field(
        default=None,
        exclude=True,
        description="Counts the tokens of a text (see `FilterConfig.with_tokenizer`); None: lengths in characters "
        "only.",
    )
    code_languages: tuple[str, ...] = Field(
        default=("python", "py", "python3", "py3"),
        description="Fence info strings of executable code (the decoder's default `code_languages`).",
    )
    low_quality_max_lines: int = Field(
        default=5,
        ge=0,
        description="A code block with this many real lines (not blank, not comment-only) or fewer is low quality "
        "(the paper's threshold).",
    )
    max_low_quality_fraction: float = Field(
        default=0.4,
        ge=0.0,
        le=1.0,
        description="Reject a sample when more than this fraction of its code blocks are low quality (the paper's).",
    )
    repetition_min_chars: int = Field(
        default=20,
        ge=2,
        description="Length of a substring the repetition check counts: long enough that LaTeX tokens such as "
        "'\\frac' or '= ' never reach it, short enough to catch a looping sentence.",
    )
    repetition_min_count: int = Field(
        default=5,
        ge=2,
        description="Non-overlapping occurrences of one such substring (in the prose, or inside one code block) "
        "that make a sample a looping generation.",
    )
    single_call_keep_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Probability of keeping a sample with exactly one code call (the paper halves them so that "
        "multi-call trajectories weigh more).",
    )
    seed: int = Field(default=0, description="Seed of the single-call down-sample (a hash of seed and sample id).")
    disabled: frozenset[str] = Field(
        default=frozenset(),
        description="Stages to skip, by name (they show in the funnel with nothing dropped).",
    )

    @field_validator("disabled", mode="before")
    @classmethod
    def _known_stages(cls, value: Any) -> Any:
        names = {value} if isinstance(value, str) else set(value)
        unknown = sorted(names - set(ALL_STAGES))
        if unknown:
            raise ValueError(
                f"unknown filter stage(s) {', '.join(map(repr, unknown))} in `disabled`; valid names are: "
                f"{', '.join(ALL_STAGES)}"
            )
        return frozenset(names)

    def with_tokenizer(self, tokenizer: Any) -> FilterConfig:
        """This config with token lengths counted by a Hugging Face tokenizer (no special tokens added)."""
        return self.model_copy(
            update={"count_tokens": lambda text: len(tokenizer.encode(text, add_special_tokens=False))}
        )


# --- helpers ---------------------------------------------------------------------------------------------------

#: The text of an injected observation: ``\n```output\n{obs}\n```\n`` (thor_engine.observation.injection).
_OBSERVATION_BODY = re.compile(r"```output[ \t]*\r?\n(.*?)(?:\r?\n)?```", re.DOTALL)
#: The last line of a failed call's observation: an exception line such as ``NameError: name 'x' ...``,
#: the reference's timeout message (``timeout_decorator.timeout_decorator.TimeoutError: 'Timed Out'``) or
#: the notebook profile's ``OutputLimitError: ...`` / ``MemoryError: ...``.
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b\s*(?::|$)")
#: The opening of an output block. Only the tool loop injects one (as an ``observation`` segment): in a model
#: segment it is an output the model invented.
OUTPUT_FENCE = "```output"
#: An inline computation with its result, ``12 * 7 = 84`` or ``$84 - (12 + 3) = 69$``: numbers joined by
#: operators (parentheses allowed), ``=`` and a number.
_NUM = r"\d[\d,]*(?:\.\d+)?"
_OP = r"(?:[-+*/\u00d7\u00f7^]|\\times|\\cdot|\\div)"
_INLINE_RESULT = re.compile(rf"(?<![\w.])\(*\s*{_NUM}(?:\s*\)*\s*{_OP}\s*\(*\s*{_NUM})+\s*\)*\s*=\s*\$?\s*-?{_NUM}")
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def _observation_texts(sample: TirSample) -> list[str]:
    out = []
    for seg in sample.segments:
        if seg.kind != "observation":
            continue
        m = _OBSERVATION_BODY.search(seg.text)
        out.append(m.group(1) if m else seg.text)
    return out


def observation_is_error(text: str) -> bool:
    """Whether an observation reads as a failed call: a traceback, or a last line naming an exception."""
    if "Traceback (most recent call last)" in text:
        return True
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and bool(_ERROR_LINE.match(lines[-1]))


def _code_blocks(text: str, cfg: FilterConfig) -> list[CodeBlock]:
    return [b for b in find_blocks(text) if is_code_language(b.language, cfg.code_languages)]


def _outside_blocks(text: str) -> str:
    """`text` with every fenced block (any language, its fences included) removed."""
    parts, pos = [], 0
    for block in find_blocks(text):
        parts.append(text[pos : block.start])
        pos = block.end
    parts.append(text[pos:])
    return "".join(parts)


def real_code_lines(code: str) -> int:
    """Lines of `code` that are neither blank nor only a ``#`` comment."""
    return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))


def find_repetition(text: str, min_chars: int, min_count: int) -> tuple[str, int] | None:
    """A substring of `min_chars` characters occurring at least `min_count` times without overlap, and its count.

    Any longer substring repeated that often has its first `min_chars` characters repeated as often, so
    counting fixed-length windows is exact. One pass over the ``len(text) - min_chars + 1`` windows with a
    dict of window -> (count, end of its last counted occurrence): greedy leftmost counting gives the most
    non-overlapping occurrences of equal-length intervals. O(n * min_chars) time (slicing and hashing one
    window), O(n) memory. Windows of whitespace only (code indentation) are not counted.
    """
    seen: dict[str, tuple[int, int]] = {}
    for i in range(len(text) - min_chars + 1):
        window = text[i : i + min_chars]
        count, last_end = seen.get(window, (0, -1))
        if i < last_end:
            continue
        if not window.strip():
            continue
        count += 1
        if count >= min_count:
            return window, count
        seen[window] = (count, i + min_chars)
    return None


# --- per-sample filters -----------------------------------------------------------------------------------------


def filter_correct(sample: TirSample, cfg: FilterConfig) -> str | None:
    """The final answer was graded correct (``sample.correct is True``)."""
    if sample.correct is True:
        return None
    return "answer not graded" if sample.correct is None else f"wrong answer {sample.answer!r} (gold {sample.gold!r})"


def filter_code_passed(sample: TirSample, cfg: FilterConfig) -> str | None:
    """No failed call, and no observation that reads as an error."""
    if sample.failed_calls:
        return f"{sample.failed_calls} of {sample.code_calls} code call(s) failed"
    for n, obs in enumerate(_observation_texts(sample), 1):
        if observation_is_error(obs):
            last = obs.strip().splitlines()[-1].strip()
            return f"observation {n} is an error: {last[:80]}"
    return None


def filter_length(sample: TirSample, cfg: FilterConfig) -> str | None:
    """Completion length within [min_chars, max_chars] and, with `count_tokens`, [min_tokens, max_tokens]."""
    text = sample.completion
    if len(text) < cfg.min_chars:
        return f"{len(text)} chars < min_chars {cfg.min_chars}"
    if len(text) > cfg.max_chars:
        return f"{len(text)} chars > max_chars {cfg.max_chars}"
    if cfg.count_tokens is not None and (cfg.min_tokens is not None or cfg.max_tokens is not None):
        n = cfg.count_tokens(text)
        if cfg.min_tokens is not None and n < cfg.min_tokens:
            return f"{n} tokens < min_tokens {cfg.min_tokens}"
        if cfg.max_tokens is not None and n > cfg.max_tokens:
            return f"{n} tokens > max_tokens {cfg.max_tokens}"
    return None


def filter_boxed(sample: TirSample, cfg: FilterConfig) -> str | None:
    """A non-empty final ``\\boxed{}`` in the model's prose (a box printed by code does not count)."""
    boxed = extract_boxed(_outside_blocks(sample.model_text))
    if boxed is None:
        return "no complete \\boxed{} in the model text"
    if not boxed.strip():
        return "the final \\boxed{} is empty"
    return None


def filter_dollars(sample: TirSample, cfg: FilterConfig) -> str | None:
    """An even number of unescaped ``$`` in the model's prose (``$$`` counts two; code and outputs ignored)."""
    prose = _outside_blocks(sample.model_text)
    count = 0
    backslashes = 0
    for ch in prose:
        if ch == "$" and backslashes % 2 == 0:
            count += 1
        backslashes = backslashes + 1 if ch == "\\" else 0
    return None if count % 2 == 0 else f"{count} unescaped '$' (odd: unbalanced math)"


def filter_fences(sample: TirSample, cfg: FilterConfig) -> str | None:
    """Every code fence of the model's text is closed (a stray ```` ``` ```` line opens a block that
    swallows the rest: the answer would be read as code)."""
    blocks = find_blocks(sample.model_text)
    open_blocks = [b for b in blocks if not b.closed]
    return f"an unclosed code fence at character {open_blocks[0].start}" if open_blocks else None


def filter_real_outputs(sample: TirSample, cfg: FilterConfig) -> str | None:
    """Every tool output in the sample really ran: no output fence inside a model segment (the model wrote its
    tool's answer itself), and every executable code block ends its model segment and is followed by an
    observation (a block the sample shows without its real output teaches the model to skip the tool)."""
    completion = [s for s in sample.segments if s.kind != "prompt"]
    for n, seg in enumerate(completion):
        if seg.kind != "model":
            continue
        at = seg.text.find(OUTPUT_FENCE)
        if at >= 0:
            return f"an output block the model wrote itself: {seg.text[at : at + 40]!r}"
        followed = n + 1 < len(completion) and completion[n + 1].kind == "observation"
        for b in _code_blocks(seg.text, cfg):
            if seg.text[b.end :].strip() or not followed:
                return f"a {b.language} block with no observation after it: {seg.text[b.start : b.start + 40]!r}"
    return None


def inline_results(text: str) -> list[str]:
    """The inline computations with a result in `text` (``12 * 7 = 84``), in order."""
    return [m.group(0) for m in _INLINE_RESULT.finditer(text)]


def filter_result_before_code(sample: TirSample, cfg: FilterConfig) -> str | None:
    """No prose before a code block (since the previous observation) states a computed result such as
    ``12 * 7 = 84``: the result must come from the block's real output, not be written ahead of it (the
    critic's prefill once carried the actor's computed line over)."""
    for seg in sample.segments:
        if seg.kind != "model":
            continue
        pos = 0
        for b in _code_blocks(seg.text, cfg):
            stated = inline_results(_outside_blocks(seg.text[pos : b.start]))
            if stated:
                return f"states {stated[0]!r} before the code that computes it"
            pos = b.end
    return None


def filter_think(sample: TirSample, cfg: FilterConfig) -> str | None:
    """Reasoning models only: exactly one complete think block, with at least one executable code block in it.

    A ``<think>`` that ends the prompt (templates that open the block for the model) counts as opened.
    """
    if not sample.reasoning_model:
        return None
    text = sample.model_text
    prompt = "".join(s.text for s in sample.segments if s.kind == "prompt")
    opened_in_prompt = prompt.rstrip().endswith(_THINK_OPEN)
    opens = text.count(_THINK_OPEN) + (1 if opened_in_prompt else 0)
    closes = text.count(_THINK_CLOSE)
    if opens != 1 or closes != 1:
        return f"{opens} '<think>' and {closes} '</think>' (need exactly one complete think block)"
    start = 0 if opened_in_prompt else text.index(_THINK_OPEN) + len(_THINK_OPEN)
    end = text.find(_THINK_CLOSE)
    if end < start:
        return "'</think>' comes before '<think>'"
    if not any(b.closed for b in _code_blocks(text[start:end], cfg)):
        return "no complete code block inside the think block"
    return None


def filter_has_code(sample: TirSample, cfg: FilterConfig) -> str | None:
    """At least one code call was executed."""
    return None if sample.code_calls > 0 else "no code call"


def filter_code_quality(sample: TirSample, cfg: FilterConfig) -> str | None:
    """At most `max_low_quality_fraction` of the code blocks have `low_quality_max_lines` real lines or fewer."""
    blocks = _code_blocks(sample.model_text, cfg)
    if not blocks:
        return None
    low = sum(1 for b in blocks if real_code_lines(b.code) <= cfg.low_quality_max_lines)
    if low / len(blocks) > cfg.max_low_quality_fraction:
        return (
            f"{low} of {len(blocks)} code block(s) have <= {cfg.low_quality_max_lines} real lines "
            f"(> {cfg.max_low_quality_fraction:.0%})"
        )
    return None


def filter_repetition(sample: TirSample, cfg: FilterConfig) -> str | None:
    """No substring of `repetition_min_chars` characters repeated `repetition_min_count` times, in the prose or
    inside any one code block. Code blocks are checked one by one: self-contained blocks each repeat their
    imports, which is not a loop; observations are not checked (printed output may legitimately repeat)."""
    text = sample.model_text
    parts = [("prose", _outside_blocks(text))] + [
        (f"code block {n}", b.code) for n, b in enumerate(find_blocks(text), 1)
    ]
    for where, part in parts:
        hit = find_repetition(part, cfg.repetition_min_chars, cfg.repetition_min_count)
        if hit is not None:
            window, count = hit
            return f"{window!r} repeated {count}+ times in the {where}"
    return None


SampleFilter = Callable[[TirSample, FilterConfig], str | None]

#: The per-sample stages, in the order they run.
SAMPLE_FILTERS: tuple[tuple[str, SampleFilter], ...] = (
    ("correct", filter_correct),
    ("code_passed", filter_code_passed),
    ("length", filter_length),
    ("boxed", filter_boxed),
    ("dollars", filter_dollars),
    ("fences", filter_fences),
    ("real_outputs", filter_real_outputs),
    ("result_before_code", filter_result_before_code),
    ("think", filter_think),
    ("has_code", filter_has_code),
    ("code_quality", filter_code_quality),
    ("repetition", filter_repetition),
)
#: The set-level stages, after the per-sample ones.
SET_STAGES: tuple[str, ...] = ("dedup", "single_call_downsample")
ALL_STAGES: tuple[str, ...] = tuple(name for name, _ in SAMPLE_FILTERS) + SET_STAGES


# --- set-level stages and the funnel ----------------------------------------------------------------------------


class Rejection(NamedTuple):
    sample: TirSample
    stage: str
    reason: str


@dataclass(frozen=True)
class FunnelStage:
    """One row of the funnel: samples entering a stage and leaving it. ``generated`` and ``kept`` rows have
    ``n_in == n_out``."""

    name: str
    n_in: int
    n_out: int
    enabled: bool = True

    @property
    def dropped(self) -> int:
        return self.n_in - self.n_out


@dataclass
class FilterResult:
    kept: list[TirSample]
    rejected: list[Rejection]
    funnel: list[FunnelStage]
    code_invocation_generated: float
    code_invocation_kept: float
    generated: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the funnel, rejections per stage and the code-invocation ratios."""
        return {
            "generated": self.generated,
            "kept": len(self.kept),
            "funnel": [
                {"stage": s.name, "in": s.n_in, "out": s.n_out, "dropped": s.dropped, "enabled": s.enabled}
                for s in self.funnel
            ],
            "rejected_by_stage": dict(self.by_stage),
            "code_invocation_ratio": {"generated": self.code_invocation_generated, "kept": self.code_invocation_kept},
        }


def code_invocation_ratio(samples: Iterable[TirSample]) -> float:
    """Fraction of samples with at least one executed code call (0.0 for no samples)."""
    samples = list(samples)
    if not samples:
        return 0.0
    return sum(1 for s in samples if s.code_calls > 0) / len(samples)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _keep_fraction_draw(seed: int, sample_id: str) -> float:
    """A uniform draw in [0, 1) fixed by (seed, sample id): reruns and reorderings agree."""
    h = hashlib.sha256(f"{seed}\x00{sample_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def apply_filters(samples: Iterable[TirSample], cfg: FilterConfig | None = None) -> FilterResult:
    """Run every enabled stage over `samples`; the kept samples keep their input order.

    ``dedup`` keeps, per ``id``, the passing sample whose completion has the smallest SHA-256 (a choice that does
    not depend on the order samples arrived in, so concurrent generation and reruns keep the same one).
    ``single_call_downsample`` keeps a sample with exactly one code call when a hash of (seed, id) falls below
    `single_call_keep_fraction`; samples with more (or no) calls are never dropped by it.
    """
    cfg = cfg or FilterConfig()
    samples = list(samples)
    rejected: list[Rejection] = []
    funnel = [FunnelStage("generated", len(samples), len(samples))]
    current = samples
    for name, fn in SAMPLE_FILTERS:
        enabled = name not in cfg.disabled
        passing = []
        for s in current:
            reason = fn(s, cfg) if enabled else None
            if reason is None:
                passing.append(s)
            else:
                rejected.append(Rejection(s, name, reason))
        funnel.append(FunnelStage(name, len(current), len(passing), enabled))
        current = passing

    # dedup: one sample per problem id.
    enabled = "dedup" not in cfg.disabled
    if enabled:
        chosen: dict[str, tuple[str, int]] = {}
        for i, s in enumerate(current):
            key = (_digest(s.completion), i)
            if s.id not in chosen or key < chosen[s.id]:
                chosen[s.id] = key
        keep_idx = {i for _, i in chosen.values()}
        passing = []
        for i, s in enumerate(current):
            if i in keep_idx:
                passing.append(s)
            else:
                rejected.append(Rejection(s, "dedup", f"another sample of {s.id} is kept"))
    else:
        passing = current
    funnel.append(FunnelStage("dedup", len(current), len(passing), enabled))
    current = passing

    # single_call_downsample
    enabled = "single_call_downsample" not in cfg.disabled
    passing = []
    for s in current:
        if enabled and s.code_calls == 1:
            draw = _keep_fraction_draw(cfg.seed, s.id)
            if draw >= cfg.single_call_keep_fraction:
                rejected.append(
                    Rejection(
                        s,
                        "single_call_downsample",
                        f"single code call, draw {draw:.3f} >= keep fraction {cfg.single_call_keep_fraction}",
                    )
                )
                continue
        passing.append(s)
    funnel.append(FunnelStage("single_call_downsample", len(current), len(passing), enabled))
    current = passing
    funnel.append(FunnelStage("kept", len(current), len(current)))

    by_stage = {name: 0 for name in ALL_STAGES}
    for r in rejected:
        by_stage[r.stage] += 1
    return FilterResult(
        kept=current,
        rejected=rejected,
        funnel=funnel,
        code_invocation_generated=code_invocation_ratio(samples),
        code_invocation_kept=code_invocation_ratio(current),
        generated=len(samples),
        by_stage=by_stage,
    )


def format_funnel(funnel: list[FunnelStage]) -> str:
    """The funnel as a Markdown table: stage, in, out, dropped, and what is left as a share of generated."""
    total = funnel[0].n_in if funnel else 0
    lines = ["| stage | in | out | dropped | left (% of generated) |", "|---|---:|---:|---:|---:|"]
    for s in funnel:
        name = s.name if s.enabled else f"{s.name} (off)"
        share = f"{100 * s.n_out / total:.1f}%" if total else "-"
        lines.append(f"| {name} | {s.n_in} | {s.n_out} | {s.dropped} | {share} |")
    return "\n".join(lines) + "\n"


def plot_funnel(funnel: list[FunnelStage], path: str | Path, title: str = "TIRGen filter funnel") -> Path:
    """Write the funnel as horizontal bars (samples left after each stage, dropped counts labelled) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [s.name if s.enabled else f"{s.name} (off)" for s in funnel]
    outs = [s.n_out for s in funnel]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(funnel) + 1.2))
    try:
        y = list(range(len(funnel)))
        ax.barh(y, outs, color=["#4c72b0" if s.enabled else "#bbbbbb" for s in funnel])
        for yi, s in zip(y, funnel, strict=True):
            label = f"{s.n_out}" + (f"  (-{s.dropped})" if s.dropped else "")
            ax.text(s.n_out, yi, " " + label, va="center", fontsize=8)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("samples")
        ax.set_title(title)
        ax.set_xlim(0, max([*outs, 1]) * 1.25)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
