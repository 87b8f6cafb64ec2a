"""Tokenising a tool-integrated trajectory for SFT exactly as the decoder builds it.

Owns: turning text segments ``[(kind, text)]`` (a TIRGen sample's ``segments``, see
``trainer/tirgen/sample.py``) into ``input_ids`` + ``labels``: each segment is tokenised
ON ITS OWN with ``add_special_tokens=False`` (the prompt segment already holds the chat
template's special tokens as text; ``model`` and ``observation`` text as plain text, so a
control token's spelling in a tool's output or the model's code stays text, as the decoder
holds it), as the decoder appends the prompt, each sampled model run and each injected
observation as separate token runs; labels are the ids on ``model``
tokens and -100 on ``prompt`` / ``observation`` / ``injected`` tokens (the semantics of
``Trajectory.loss_mask()``); then the chat template's end-of-turn token (Qwen:
``<|im_end|>``; the tokenizer's EOS when the template has none) is appended as a model
token, as the decoder's trajectory ends with the EOS the engine sampled. Also the inverse
for checks: `trajectory_segments` turns a decoder ``Trajectory.to_dict()`` back into text
segments, so a recorded trajectory and its rebuild can be compared id for id.

Does not own: reading datasets or length filtering (data.py), training (train.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from thor_engine.prompting import encode_plain

__all__ = [
    "IGNORE_INDEX",
    "SEGMENT_KINDS",
    "EncodedSample",
    "SegmentError",
    "encode_segments",
    "encode_trajectory_segments",
    "end_token_id",
    "normalise_segments",
    "trajectory_segments",
]

IGNORE_INDEX = -100
SEGMENT_KINDS = ("prompt", "model", "observation", "injected")
_MARKER = "THOR-END-PROBE-7c1e"


class SegmentError(ValueError):
    """A sample whose segments cannot be trained on (unknown kind, no model text, bad shape)."""


@dataclass(frozen=True)
class EncodedSample:
    """One training sequence: ids, labels (-100 where not trained on) and per-segment lengths."""

    input_ids: list[int]
    labels: list[int]
    segment_kinds: list[str]
    segment_lengths: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def loss_mask(self) -> list[int]:
        """1 where the token is trained on (a model token), as ``Trajectory.loss_mask()``."""
        return [0 if label == IGNORE_INDEX else 1 for label in self.labels]

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


def end_token_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: what the chat template writes right after the
    assistant's text (Qwen: ``<|im_end|>``, Llama 3: ``<|eot_id|>``); the EOS token otherwise."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARKER}], tokenize=False
            )
        except Exception:  # noqa: BLE001 - any template failure falls back to the EOS token
            text = ""
        at = text.find(_MARKER) if isinstance(text, str) else -1
        if at >= 0:
            tail = text[at + len(_MARKER) :]
            ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
            if ids and (ids[0] in special or ids[0] in added):
                return int(ids[0])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SegmentError(
            "the tokenizer has neither a chat template with an end-of-turn token nor an EOS token: "
            "SFT cannot end the trajectories; use a tokenizer with eos_token set"
        )
    return int(eos)


def normalise_segments(segments: Iterable[Any]) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs from SegmentText models, dicts with kind/text, or pairs."""
    out: list[tuple[str, str]] = []
    for n, seg in enumerate(segments):
        if isinstance(seg, Mapping):
            kind, text = seg.get("kind"), seg.get("text")
        elif hasattr(seg, "kind") and hasattr(seg, "text"):
            kind, text = seg.kind, seg.text
        elif isinstance(seg, Sequence) and not isinstance(seg, str) and len(seg) == 2:
            kind, text = seg
        else:
            raise SegmentError(f"segment {n} is {seg!r}: expected {{'kind': ..., 'text': ...}} or a (kind, text) pair")
        kind = getattr(kind, "value", kind)
        if kind not in SEGMENT_KINDS:
            raise SegmentError(f"segment {n} has kind {kind!r}: expected one of {', '.join(SEGMENT_KINDS)}")
        if not isinstance(text, str):
            raise SegmentError(f"segment {n} ({kind}) has text of type {type(text).__name__}: expected a string")
        out.append((str(kind), text))
    return out


def encode_segments(
    tokenizer: Any, segments: Iterable[Any], *, end_id: int | None = None, append_end: bool = True
) -> EncodedSample:
    """Token ids and labels of one trajectory, segment by segment as the decoder appends them.

    *end_id* defaults to `end_token_id(tokenizer)`; pass it to avoid re-probing the template
    per sample. Raises `SegmentError` when the sample has no model text to train on.
    """
    pairs = normalise_segments(segments)
    if not any(kind == "model" and text for kind, text in pairs):
        raise SegmentError(
            f"sample has no non-empty model segment (kinds: {[k for k, _ in pairs]}): nothing to train on; "
            "drop it from the dataset or fix the generator"
        )
    ids: list[int] = []
    labels: list[int] = []
    kinds: list[str] = []
    lengths: list[int] = []
    for kind, text in pairs:
        if not text:
            continue
        # model text and tool output are plain text, as the decoder holds them: a model cannot sample a
        # control token mid-text (it ends the turn) and a tool's output is injected with encode_plain, so a
        # control token's spelling in either stays text; the prompt (rendered by the template) and the
        # server's injected text keep their control tokens
        plain = kind in ("model", "observation")
        seg = list(encode_plain(tokenizer, text) if plain else tokenizer.encode(text, add_special_tokens=False))
        ids += seg
        labels += seg if kind == "model" else [IGNORE_INDEX] * len(seg)
        kinds.append(kind)
        lengths.append(len(seg))
    if append_end:
        end = end_token_id(tokenizer) if end_id is None else end_id
        ids.append(end)
        labels.append(end)
        if kinds and kinds[-1] == "model":
            lengths[-1] += 1
        else:
            kinds.append("model")
            lengths.append(1)
    return EncodedSample(ids, labels, kinds, lengths)


def trajectory_segments(
    tokenizer: Any, trajectory: Mapping[str, Any], *, end_ids: Iterable[int] | None = None
) -> tuple[list[tuple[str, str]], bool]:
    """Text segments of a decoder trajectory (``Trajectory.to_dict()``), and whether it ended
    with an end token (which is then left out of the text, as in a TIRGen sample).

    *end_ids*: the ids that end a turn (the engine's EOS set); default `end_token_id` and EOS.
    """
    segs = trajectory.get("segments")
    if not isinstance(segs, list) or not segs:
        raise SegmentError("trajectory has no 'segments' list: pass Trajectory.to_dict() (include_trajectory=True)")
    ends = set(end_ids) if end_ids is not None else {end_token_id(tokenizer), tokenizer.eos_token_id}
    out: list[tuple[str, str]] = []
    ended = False
    for n, seg in enumerate(segs):
        kind, token_ids = seg.get("kind"), list(seg.get("token_ids") or [])
        if kind not in SEGMENT_KINDS:
            raise SegmentError(f"trajectory segment {n} has kind {kind!r}: expected one of {', '.join(SEGMENT_KINDS)}")
        if n == len(segs) - 1 and kind == "model" and token_ids and token_ids[-1] in ends:
            token_ids, ended = token_ids[:-1], True
        out.append((kind, tokenizer.decode(token_ids, skip_special_tokens=False)))
    return out, ended


def encode_trajectory_segments(
    tokenizer: Any, trajectory: Mapping[str, Any], *, end_ids: Iterable[int] | None = None
) -> EncodedSample:
    """Rebuild a decoder trajectory from its decoded text segments with `encode_segments`.

    The end token is appended only when the recorded trajectory ended with one, and then as
    the id it recorded; so the rebuild equals the recording id for id when tokenisation is
    faithful (the test of the SFT data path).
    """
    texts, ended = trajectory_segments(tokenizer, trajectory, end_ids=end_ids)
    last = trajectory["segments"][-1]["token_ids"][-1] if ended else None
    return encode_segments(tokenizer, texts, end_id=last, append_end=ended)
