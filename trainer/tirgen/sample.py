"""One TIRGen sample: a tool-integrated trajectory as text segments plus where it came from.

Owns: the on-disk schema of TIRGen's output (one JSON object per line of
``samples.jsonl``, loadable with ``datasets.load_dataset("json", ...)``) and reading it
back. A sample's ``segments`` are ``(kind, text)`` runs in order:

- ``prompt``: the chat-templated prompt, rendered by the policy's tokenizer exactly as
  the server renders a request (``thor_engine.prompting.render_chat``: THOR's tool
  instructions in the system message), ending with the assistant header;
- ``model``: text the model writes (trained on);
- ``observation``: an injected ````` ```output ````` block, as the decoder injects it
  (``thor_engine.observation.injection``): masked from the loss;
- ``injected``: other control text the decoder inserts (masked).

The end-of-turn token is not part of the text: SFT appends the tokenizer's end token
after the last model segment, as the decoder's trajectory ends with the sampled EOS.

Does not own: generating samples (generate.py), filtering them (filters.py) or
tokenising them for training (trainer/sft/).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

__all__ = ["SegmentKindName", "SegmentText", "TirSample", "read_samples"]

SegmentKindName = Literal["prompt", "model", "observation", "injected"]


class SegmentText(BaseModel):
    kind: SegmentKindName
    text: str


class TirSample(BaseModel):
    """A tool-integrated trajectory for training, with its provenance."""

    id: str = Field(description="'<source>/<problem_id>': unique per problem in a dataset")
    problem_id: str
    source: str = Field(description="benchmark or file the problem came from")
    problem: str
    gold: str
    messages: list[dict[str, str]] = Field(
        description="the conversation the prompt segment renders (before THOR's tool instructions are added)"
    )
    segments: list[SegmentText]
    answer: str | None = Field(default=None, description="content of the final \\boxed{} of the model's text")
    correct: bool | None = None
    code_calls: int = 0
    failed_calls: int = 0
    actor_model: str = ""
    critic_model: str = ""
    tokenizer: str = Field(default="", description="tokenizer (path or name) that rendered the prompt segment")
    reasoning_model: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def completion(self) -> str:
        """Everything after the prompt: model text and observations, in order."""
        return "".join(s.text for s in self.segments if s.kind != "prompt")

    @property
    def model_text(self) -> str:
        return "".join(s.text for s in self.segments if s.kind == "model")


def read_samples(path: str | Path) -> Iterator[TirSample]:
    """Samples of a ``samples.jsonl``; a malformed line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such TIRGen dataset file; run `python -m trainer.tirgen` first")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield TirSample.model_validate(json.loads(line))
            except (json.JSONDecodeError, ValidationError) as e:
                raise ValueError(f"{path}:{n}: not a TIRGen sample ({e.__class__.__name__}: {e})") from e
