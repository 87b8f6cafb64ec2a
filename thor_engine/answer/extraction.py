"""Final-answer extraction: the content of the last ``\\boxed{...}`` in model text.

Owns: finding the last ``\\boxed``/``\\fbox`` and reading its (brace-balanced) argument,
and the brace matcher the normaliser shares. Does not own: which part of a completion
the answer is taken from (the decoder decides what text it passes in), normalisation
(:mod:`.normalisation`), checking (:mod:`.verification`) or voting (:mod:`.voting`).
"""

from __future__ import annotations

import re

__all__ = ["extract_boxed", "matching_brace"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_TOKEN_RE = re.compile(r"[^\s${}]+")


def matching_brace(s: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx``; escaped ``\\{``/``\\}`` skipped."""
    depth = 0
    i = open_idx
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are followed; escaped ``\\{``/``\\}`` (set braces) do not count.
    ``\\boxed 5`` (whitespace, then one token up to whitespace, ``$`` or a brace) is
    accepted too. Returns None when there is no box, or when the last one is unbalanced
    (a truncated completion) or not followed by an argument.
    """
    last = None
    for match in _BOX_RE.finditer(text):
        last = match
    if last is None:
        return None
    i = last.end()
    j = i
    while j < len(text) and text[j] in " \t\n":
        j += 1
    if j < len(text) and text[j] == "{":
        end = matching_brace(text, j)
        return None if end is None else text[j + 1 : end]
    if j > i:
        token = _BARE_TOKEN_RE.match(text, j)
        if token:
            return token.group(0)
    return None
