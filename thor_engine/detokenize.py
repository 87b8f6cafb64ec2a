"""Incremental detokenisation with a character offset per token.

Owns: `TokenText`, the text of a growing (and sometimes truncated) token sequence,
kept exactly equal to `tokenizer.decode(ids, skip_special_tokens=...)` for
byte-level BPE tokenizers (Qwen, Llama 3, GPT-2 families) without decoding the
whole sequence again: each new token is decoded in a small window of its
predecessors (the way vLLM's incremental detokenizer does it), so a multi-byte
character split across tokens appears once it is complete, and a SentencePiece
leading space is decided by its context. Every token records the text length
after it, so "how many tokens make up the first c characters" is a binary search
over integers, never a decode.

Does not own: which tokens belong to a trajectory (trajectory.py) or what the
text means (codeblocks.py, decoder.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

#: Tokens of left context used to decode a new token (enough for any merge rule we know).
_CONTEXT = 6
#: A token sequence that still decodes to a replacement character after this many tokens
#: is genuinely invalid UTF-8: accept the replacement character rather than wait forever.
_MAX_PENDING = 8
_REPLACEMENT = "\ufffd"


class TokenText:
    """Token ids, their decoded text, and the text length after each token."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        # ends[k] = len(text) once tokens[: k + 1] are decoded (tokens whose bytes do not yet
        # form a complete character share the offset of the text before them)
        self.ends: list[int] = []
        self._stable = 0  # tokens whose text is final in self.text

    def __len__(self) -> int:
        return len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the text they added (possibly "", if a character is incomplete)."""
        before = len(self.text)
        for tid in token_ids:
            self.ids.append(int(tid))
            start = max(0, self._stable - _CONTEXT)
            prefix = self._decode(self.ids[start : self._stable])
            full = self._decode(self.ids[start:])
            pending = len(self.ids) - self._stable
            if full.endswith(_REPLACEMENT) and pending < _MAX_PENDING:
                self.ends.append(len(self.text))
                continue
            delta = full[len(prefix) :] if full.startswith(prefix) else full[len(_common_prefix(prefix, full)) :]
            self.text += delta
            self.ends.append(len(self.text))
            self._stable = len(self.ids)
        return self.text[before:]

    def truncate(self, num_tokens: int) -> list[int]:
        """Keep the first `num_tokens` tokens; return the dropped ids."""
        if num_tokens >= len(self.ids):
            return []
        dropped = self.ids[num_tokens:]
        del self.ids[num_tokens:]
        del self.ends[num_tokens:]
        self._stable = min(self._stable, num_tokens)
        self.text = self.text[: self.ends[num_tokens - 1]] if num_tokens else ""
        return dropped

    def offset(self, num_tokens: int) -> int:
        """Length of the text of the first `num_tokens` tokens."""
        return self.ends[num_tokens - 1] if num_tokens > 0 else 0

    def tokens_within(self, char_offset: int) -> int:
        """The largest k such that the first k tokens decode to at most `char_offset` characters."""
        return bisect.bisect_right(self.ends, char_offset)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter string
        if x != y:
            break
        n += 1
    return a[:n]
