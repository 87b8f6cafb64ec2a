"""A token-level trajectory: token ids with a segment kind per token.

Owns: the exact token sequence of one tool-integrated trajectory (prompt, model
text, injected observations, injected control text) and the operations the
decoder needs (append, truncate at a boundary that never crosses a protected
segment) plus the views the trainer and server need (loss mask, per-kind counts,
text by kind). Text is always obtained by decoding these tokens; accumulated text
is never re-tokenised. Optionally (`record_logprobs`, for RL) one sampled
log-probability per token, kept aligned with the ids through every append and
truncation: a float for a token the model sampled, None for prompt, observation and
injected tokens and for model tokens the decoder re-encoded.

Does not own: generation, execution, or formatting of observations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class SegmentKind(str, Enum):
    prompt = "prompt"  # the rendered request (chat template, system, user)
    model = "model"  # sampled by the model: trained on
    observation = "observation"  # tool output injected by the decoder: masked from the loss
    injected = "injected"  # control text the decoder inserts (e.g. the thinking-budget cut)


@dataclass
class Segment:
    kind: SegmentKind
    token_ids: list[int]
    # One entry per token when the trajectory records log-probabilities, else None.
    logprobs: list[float | None] | None = None


@dataclass
class Trajectory:
    """Token ids with one `SegmentKind` per token, kept as a list of runs."""

    segments: list[Segment] = field(default_factory=list)
    # Index (in tokens) below which nothing may be removed: the end of the prompt or
    # of the latest committed observation. Backtracks never cross it.
    protected: int = 0
    # Keep one log-probability (or None) per token, aligned with the ids.
    record_logprobs: bool = False
    # How many truncations removed tokens so far (lets a reader of the ids see they changed).
    truncations: int = 0

    @classmethod
    def from_prompt(cls, prompt_ids: list[int], *, record_logprobs: bool = False) -> Trajectory:
        t = cls(record_logprobs=record_logprobs)
        t.append(prompt_ids, SegmentKind.prompt)
        t.protect()
        return t

    def __len__(self) -> int:
        return sum(len(s.token_ids) for s in self.segments)

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def kinds(self) -> list[SegmentKind]:
        return [s.kind for s in self.segments for _ in s.token_ids]

    @property
    def logprobs(self) -> list[float | None] | None:
        """One entry per token (None where nothing was sampled), or None when not recorded."""
        if not self.record_logprobs:
            return None
        return [lp for s in self.segments for lp in (s.logprobs or [None] * len(s.token_ids))]

    def append(self, token_ids: list[int], kind: SegmentKind, logprobs: list[float | None] | None = None) -> None:
        """Append tokens of one kind; `logprobs` (one per token) only when the trajectory records them."""
        if logprobs is not None:
            if not self.record_logprobs:
                raise ValueError("logprobs given to a trajectory that does not record them: use record_logprobs=True")
            if len(logprobs) != len(token_ids):
                raise ValueError(f"{len(logprobs)} logprobs for {len(token_ids)} tokens: give one per token")
        if not token_ids:
            return
        values: list[float | None] | None = None
        if self.record_logprobs:
            values = list(logprobs) if logprobs is not None else [None] * len(token_ids)
        if self.segments and self.segments[-1].kind is kind:
            last = self.segments[-1]
            last.token_ids.extend(token_ids)
            if values is not None:
                if last.logprobs is None:
                    last.logprobs = [None] * (len(last.token_ids) - len(values))
                last.logprobs.extend(values)
        else:
            self.segments.append(Segment(kind, list(token_ids), values))

    def protect(self) -> None:
        """Mark everything so far as committed: later truncations stop here."""
        self.protected = len(self)

    def truncate(self, length: int) -> list[int]:
        """Drop tokens from the end so that `length` remain; return the dropped ids.

        Raises ValueError when that would cut into the protected prefix.
        """
        if length < self.protected:
            raise ValueError(f"cannot truncate to {length}: tokens below {self.protected} are committed")
        dropped: list[int] = []
        excess = len(self) - length
        while excess > 0 and self.segments:
            seg = self.segments[-1]
            if len(seg.token_ids) <= excess:
                dropped[:0] = seg.token_ids
                excess -= len(seg.token_ids)
                self.segments.pop()
            else:
                dropped[:0] = seg.token_ids[-excess:]
                del seg.token_ids[-excess:]
                if seg.logprobs is not None:
                    del seg.logprobs[-excess:]
                excess = 0
        if dropped:
            self.truncations += 1
        return dropped

    def count(self, kind: SegmentKind) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.kind is kind)

    def tail(self, kind: SegmentKind, limit: int) -> list[int]:
        """The last `limit` (or fewer) token ids of one kind, in order, the other kinds left out."""
        out: list[int] = []
        for seg in reversed(self.segments):
            if len(out) >= limit:
                break
            if seg.kind is kind:
                out[:0] = seg.token_ids[-(limit - len(out)) :]
        return out

    def loss_mask(self) -> list[int]:
        """1 for tokens the model generated (trained on), 0 for prompt, observations, injections."""
        return [1 if k is SegmentKind.model else 0 for k in self.kinds]

    def spans(self) -> list[tuple[int, int, SegmentKind]]:
        """(start, end, kind) token ranges of the segments after the prompt."""
        out, pos = [], 0
        for seg in self.segments:
            if seg.kind is not SegmentKind.prompt:
                out.append((pos, pos + len(seg.token_ids), seg.kind))
            pos += len(seg.token_ids)
        return out

    def completion_segments(self) -> list[Segment]:
        """Everything after the prompt."""
        return [s for s in self.segments if s.kind is not SegmentKind.prompt]

    def text(self, tokenizer: Any, *, include_prompt: bool = False) -> str:
        segs = self.segments if include_prompt else self.completion_segments()
        return "".join(tokenizer.decode(s.token_ids, skip_special_tokens=False) for s in segs)

    def to_dict(self) -> dict[str, Any]:
        """{"segments": [{"kind", "token_ids"}...], "protected"}; each segment also has "logprobs"
        (one float or None per token) when the trajectory records them."""
        segments: list[dict[str, Any]] = []
        for s in self.segments:
            d: dict[str, Any] = {"kind": s.kind.value, "token_ids": s.token_ids}
            if self.record_logprobs:
                d["logprobs"] = s.logprobs if s.logprobs is not None else [None] * len(s.token_ids)
            segments.append(d)
        return {"segments": segments, "protected": self.protected}
