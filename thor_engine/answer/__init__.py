"""Final answers: extract them from model text, normalise them, check them, vote on them.

This package owns everything between a finished completion and a correctness bit, in
four modules:

- :mod:`.extraction`: the content of the last ``\\boxed{...}`` in a text;
- :mod:`.normalisation`: a canonical string per answer, so cosmetic differences vanish;
- :mod:`.verification`: whether a prediction equals the gold answer (string equality
  after normalisation, then math-verify/sympy in killable worker processes);
- :mod:`.voting`: majority voting over several samples' answers.

It does not generate anything and knows nothing of HTTP or tokens. Everything public is
re-exported here: ``from thor_engine.answer import extract_boxed, majority_vote, ...``.
"""

from __future__ import annotations

from .extraction import extract_boxed
from .normalisation import MAX_ANSWER_CHARS, normalize_answer
from .verification import AnswerChecker, _verify_in_worker, answers_match, answers_match_async, default_checker
from .voting import majority_vote

__all__ = [
    "MAX_ANSWER_CHARS",
    "AnswerChecker",
    "_verify_in_worker",
    "answers_match",
    "answers_match_async",
    "default_checker",
    "extract_boxed",
    "majority_vote",
    "normalize_answer",
]
