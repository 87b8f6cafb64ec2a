"""Finding fenced code blocks in model text.

Owns: recognising Markdown fences the way the decoder needs: an opening fence
(three or more backticks at a line start, with an info string such as `python`,
`py` or `Python3`), its closing fence (a line of backticks only), blocks left
open at the end, and which fenced block, if any, the text ends with.

Does not own: stop strings or generation (decoder.py). Follows CommonMark for
fences, so backticks inside a line of code (`print("```")`) never open or close
a block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCE = re.compile(r"^( {0,3})(`{3,})[ \t]*([^`\n]*?)[ \t]*$")


@dataclass(frozen=True)
class CodeBlock:
    language: str  # the info string's first word, lower-cased ("" when absent)
    code: str
    start: int  # offset of the opening fence's first backtick
    end: int  # offset just after the closing fence (len(text) when still open)
    closed: bool


def find_blocks(text: str) -> list[CodeBlock]:
    """All fenced blocks in `text`, in order."""
    blocks: list[CodeBlock] = []
    pos = 0
    open_start = -1
    open_ticks = ""
    open_lang = ""
    body_start = 0
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        m = _FENCE.match(stripped)
        if open_start < 0:
            if m:
                open_start = pos + len(m.group(1))
                open_ticks = m.group(2)
                open_lang = (m.group(3).split() or [""])[0].lower()
                body_start = pos + len(line)
        elif m and not m.group(3) and len(m.group(2)) >= len(open_ticks):
            code = text[body_start:pos]
            blocks.append(CodeBlock(open_lang, code, open_start, pos + len(m.group(1)) + len(m.group(2)), True))
            open_start = -1
        pos += len(line)
    if open_start >= 0:
        blocks.append(CodeBlock(open_lang, text[body_start:], open_start, len(text), False))
    return blocks


def trailing_block(text: str) -> CodeBlock | None:
    """The closed block that `text` ends with (only whitespace after its closing fence), if any."""
    blocks = find_blocks(text)
    if not blocks:
        return None
    last = blocks[-1]
    if last.closed and not text[last.end:].strip():
        return last
    return None


def is_code_language(language: str, languages: tuple[str, ...]) -> bool:
    return language.lower() in {lang.lower() for lang in languages}
