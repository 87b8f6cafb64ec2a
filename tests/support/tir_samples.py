"""The tiny TIR model's memorised problems as TIRGen samples (`TirSample`), for SFT tests.

Owns: turning `tests.support.tiny_tir_model.TIR_PROBLEMS` into real `TirSample`s (prompt
segment rendered by `thor_engine.prompting.render_chat` and decoded to text, as TIRGen
writes it; model and observation segments from the memorised completion) and writing
them as a ``samples.jsonl``.

Does not own: the sample schema (trainer/tirgen/sample.py) or the model (tiny_tir_model.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.tiny_tir_model import TIR_PROBLEMS, TirProblem
from trainer.tirgen.sample import SegmentText, TirSample

__all__ = ["tiny_tir_samples", "write_samples_jsonl"]


def tiny_tir_samples(tokenizer: Any, problems: tuple[TirProblem, ...] = TIR_PROBLEMS) -> list[TirSample]:
    from thor_engine.prompting import render_chat

    out = []
    for p in problems:
        messages = [{"role": "user", "content": p.prompt}]
        prompt = tokenizer.decode(render_chat(tokenizer, messages), skip_special_tokens=False)
        segs = [SegmentText(kind="prompt", text=prompt)] + [SegmentText(kind=k, text=t) for k, t in p.segments()]
        out.append(
            TirSample(
                id=f"tiny/{p.name}",
                problem_id=p.name,
                source="tiny",
                problem=p.prompt,
                gold=p.answer,
                messages=messages,
                segments=segs,
                answer=p.answer,
                correct=True,
                code_calls=p.rounds,
                actor_model="tiny-tir",
                critic_model="tiny-tir",
            )
        )
    return out


def write_samples_jsonl(path: Path, samples: list[TirSample]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(s.model_dump_json() + "\n" for s in samples))
    return path
