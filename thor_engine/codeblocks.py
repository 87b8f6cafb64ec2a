"""Finding fenced code blocks in model text.

Owns: recognising Markdown fences the way the decoder needs: an opening fence
(three or more backticks at a line start, possibly indented, as inside a list
item, with an info string such as `python`, `py` or `Python3`), its closing fence
(a line of at least as many backticks and nothing else but whitespace, with `\\n`
or `\\r\\n` endings), blocks left open at the end, which fenced block, if any, the
text ends with, and `FenceWatch`, which follows a growing text line by line and
says the moment a code block closes or the model opens an ```` ```output ```` block
of its own. Code of an indented block is returned dedented (the fence's own
indentation removed from every line, as CommonMark does, then any common indent).

Does not own: stop strings or generation (decoder.py). Follows CommonMark for
fences, so backticks inside a line of code (`print("```")`) never open or close
a block; unlike CommonMark, any indentation is accepted (models indent fences
inside list items by four spaces or more).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

_FENCE = re.compile(r"^([ \t]*)(`{3,})[ \t]*([^`\r\n]*?)[ \t]*$")
#: An output block the model opens itself (any case, any indentation, optional space).
_OUTPUT_OPEN = re.compile(r"^[ \t]*`{3,}[ \t]*output\b", re.IGNORECASE)


@dataclass(frozen=True)
class CodeBlock:
    language: str  # the info string's first word, lower-cased ("" when absent)
    code: str  # dedented
    start: int  # offset of the opening fence's line (its indentation included)
    end: int  # offset just after the closing fence's backticks (len(text) when still open)
    closed: bool


def _dedent(body: str, indent: str) -> str:
    if not indent:
        return body
    lines = body.splitlines(keepends=True)
    out = []
    for line in lines:
        n = 0
        while n < len(indent) and n < len(line) and line[n] in " \t":
            n += 1
        out.append(line[n:])
    return textwrap.dedent("".join(out))


class _Scanner:
    """Fence state over complete lines; shared by `find_blocks` and `FenceWatch`."""

    def __init__(self) -> None:
        self.open_start = -1
        self.open_ticks = ""
        self.open_lang = ""
        self.open_indent = ""
        self.body_start = 0

    def line(self, text: str, pos: int, line: str) -> CodeBlock | None:
        """Feed the complete line starting at `pos`; return a block if this line closed one."""
        stripped = line.rstrip("\r\n")
        m = _FENCE.match(stripped)
        if self.open_start < 0:
            if m:
                self.open_start = pos
                self.open_indent = m.group(1)
                self.open_ticks = m.group(2)
                self.open_lang = (m.group(3).split() or [""])[0].lower()
                self.body_start = pos + len(line)
            return None
        if m and not m.group(3) and len(m.group(2)) >= len(self.open_ticks):
            block = CodeBlock(
                self.open_lang,
                _dedent(text[self.body_start : pos], self.open_indent),
                self.open_start,
                pos + len(m.group(1)) + len(m.group(2)),
                True,
            )
            self.open_start = -1
            return block
        return None

    def open_block(self, text: str) -> CodeBlock | None:
        if self.open_start < 0:
            return None
        return CodeBlock(
            self.open_lang, _dedent(text[self.body_start :], self.open_indent), self.open_start, len(text), False
        )


def find_blocks(text: str) -> list[CodeBlock]:
    """All fenced blocks in `text`, in order."""
    blocks: list[CodeBlock] = []
    scan = _Scanner()
    pos = 0
    for line in text.splitlines(keepends=True):
        block = scan.line(text, pos, line)
        if block is not None:
            blocks.append(block)
        pos += len(line)
    last = scan.open_block(text)
    if last is not None:
        blocks.append(last)
    return blocks


def trailing_block(text: str) -> CodeBlock | None:
    """The closed block that `text` ends with (only whitespace after its closing fence), if any."""
    blocks = find_blocks(text)
    if not blocks:
        return None
    last = blocks[-1]
    if last.closed and not text[last.end :].strip():
        return last
    return None


def is_code_language(language: str, languages: tuple[str, ...]) -> bool:
    return language.lower() in {lang.lower() for lang in languages}


@dataclass(frozen=True)
class FenceEvent:
    kind: str  # "code_closed": a code block's closing fence line is complete; "output_opened"
    position: int  # code_closed: end of the closing fence's line; output_opened: start of its line
    block: CodeBlock | None = None  # the closed code block (code_closed only)


class FenceWatch:
    """Follows one round of model text as it grows; reports the first event that ends the round.

    `code_closed`: a block in one of `languages` was closed by a complete fence line.
    `output_opened`: outside any block (or in place of a code block's closing fence) the
    model started a line that opens an ```` ```output ```` block: everything from that line
    on is invented and must be cut.
    """

    def __init__(self, languages: tuple[str, ...], start: int = 0) -> None:
        self.languages = languages
        self._scan = _Scanner()
        self._pos = start  # start of the first line not yet fed (offsets are into the whole text)

    def feed(self, text: str) -> FenceEvent | None:
        while True:
            nl = text.find("\n", self._pos)
            if nl < 0:
                break
            line = text[self._pos : nl + 1]
            event = self._line(text, line)
            self._pos = nl + 1
            if event is not None:
                return event
        partial = text[self._pos :]
        if partial and _OUTPUT_OPEN.match(partial) and not self._in_non_code_block():
            return self._output_opened(text)
        return None

    def _in_non_code_block(self) -> bool:
        return self._scan.open_start >= 0 and not is_code_language(self._scan.open_lang, self.languages)

    def _output_opened(self, text: str) -> FenceEvent:
        if self._scan.open_start >= 0:
            # "```output" where the closing fence belongs: the code block ends on the line before
            body = text[self._scan.body_start : self._pos]
            block = CodeBlock(
                self._scan.open_lang, _dedent(body, self._scan.open_indent), self._scan.open_start, self._pos, True
            )
            return FenceEvent("output_opened", self._pos, block)
        return FenceEvent("output_opened", self._pos)

    def _line(self, text: str, line: str) -> FenceEvent | None:
        if _OUTPUT_OPEN.match(line) and not self._in_non_code_block():
            return self._output_opened(text)
        block = self._scan.line(text, self._pos, line)
        if block is not None and is_code_language(block.language, self.languages):
            return FenceEvent("code_closed", self._pos + len(line), block)
        return None
