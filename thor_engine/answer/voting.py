"""Majority voting over the final answers of several samples.

Owns: :func:`majority_vote` (groups by :func:`~.normalisation.normalize_answer`, ties to
the group seen first). Does not own: extraction, verification, or how the decoder
reports votes.
"""

from __future__ import annotations

from .normalisation import normalize_answer

__all__ = ["majority_vote"]


def majority_vote(answers: list[str | None]) -> str | None:
    """The most common answer, as first written; None if there is no answer at all.

    Answers are grouped by :func:`normalize_answer` equality (cheap and deterministic;
    ``1/2`` and ``0.5`` form two groups, ``\\frac12`` and ``1/2`` one). None and answers
    that normalise to "" are abstentions. Ties go to the group seen first.
    """
    counts: dict[str, int] = {}
    first_spelling: dict[str, str] = {}
    for answer in answers:
        if answer is None or not (key := normalize_answer(answer)):
            continue
        counts[key] = counts.get(key, 0) + 1
        first_spelling.setdefault(key, answer)
    if not counts:
        return None
    return first_spelling[max(counts, key=counts.__getitem__)]  # max keeps the first of equals
