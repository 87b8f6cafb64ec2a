"""Final answers: extract them from model text, normalise them, check them.

This module owns everything between a finished completion and a correctness bit:
taking the last ``\\boxed{...}`` out of the text, normalising answer strings so that
cosmetic differences vanish, deciding whether a prediction equals the gold answer
(string equality after normalisation, then math-verify/sympy), and majority voting.

It does not generate anything and knows nothing of HTTP or tokens.

math-verify guards its work with ``signal.alarm``, which only works in the main
thread, and sympy can run for ever on inputs such as towers of powers. So the
math-verify part runs in worker processes owned by :class:`AnswerChecker`, each call
under a hard deadline: a worker that overruns is killed, replaced on next use, and the
pair is scored as not equal. Nothing here can hang a caller.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import multiprocessing
import os
import queue
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Self

__all__ = [
    "MAX_ANSWER_CHARS",
    "AnswerChecker",
    "answers_match",
    "answers_match_async",
    "default_checker",
    "extract_boxed",
    "majority_vote",
    "normalize_answer",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_TOKEN_RE = re.compile(r"[^\s${}]+")


def _matching_brace(s: str, open_idx: int) -> int | None:
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
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    j = i
    while j < len(text) and text[j] in " \t\n":
        j += 1
    if j < len(text) and text[j] == "{":
        end = _matching_brace(text, j)
        return None if end is None else text[j + 1 : end]
    if j > i:
        token = _BARE_TOKEN_RE.match(text, j)
        if token:
            return token.group(0)
    return None


# ------------------------------------------------------------------------ normalisation

MAX_ANSWER_CHARS = 2000
"""Longer answers are not normalised (see :func:`normalize_answer`)."""

# Unit words dropped from answers. Inside \text{...} any of them goes; as plain text only
# the multi-letter ones, and only after "<digit><space>", since "5m" may be a product.
_UNITS = (
    "mm|cm|m|km|in|inch|inches|ft|foot|feet|yd|yard|yards|mi|mile|miles|"
    "meter|meters|metre|metres|centimeter|centimeters|millimeter|millimeters|"
    "kilometer|kilometers|mg|g|kg|gram|grams|kilogram|kilograms|lb|lbs|pound|pounds|"
    "ounce|ounces|oz|l|ml|liter|liters|litre|litres|gallon|gallons|"
    "s|sec|second|seconds|min|minute|minutes|h|hr|hrs|hour|hours|day|days|week|weeks|"
    "month|months|year|years|mph|"
    "degree|degrees|deg|radian|radians|dollar|dollars|cent|cents|"
    "unit|units|square units|sq units|sq\\.? ?units|cubic units|percent|%"
)
# Commands whose argument is read as plain text; only the upright ones can hold a unit
# (\mathbf{m} is a vector, not metres).
_TEXT_CMDS = r"\\(?:text|textrm|textbf|textit|textup|texttt|textnormal|mathrm|mathbf|mathit|mbox)"
_UNIT_CMDS = r"\\(?:text|textrm|textup|textnormal|mathrm|mbox)"
_TEXT_UNIT_RE = re.compile(
    _UNIT_CMDS + r"\s*\{\s*(?:" + _UNITS + r")\s*\}(?:\s*\^\s*\{?\s*[23]\s*\}?)?",
    re.IGNORECASE,
)
_TEXT_WRAP_RE = re.compile(_TEXT_CMDS + r"\s*\{([^{}]*)\}")
_PLAIN_UNIT_RE = re.compile(
    r"(?<=[\d}])\s+(?:"
    + "|".join(u for u in _UNITS.split("|") if len(u) > 1)
    + r")(?:\s*\^\s*\{?[23]\}?)?\s*\.?\s*$",
    re.IGNORECASE,
)
# "\\" (a row break) is matched first so the "\\ " of a matrix is never read as "\ ".
_SPACING_RE = re.compile(r"\\\\|\\[!,;: ]|\\q?quad(?![a-zA-Z])|~")
_SIZING_RE = re.compile(r"\\left\.|\\right\.|\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![a-zA-Z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![a-zA-Z])|°|\\degree(?![a-zA-Z])")
_CTRL_SPACE_RE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])")
_CHOICE_RE = re.compile(r"^\(?([A-Z])\)$")
_ASSIGN_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:=|\\in(?![a-zA-Z]))(.+)$")
_CTRL_WORD_RE = re.compile(r"\\[a-zA-Z]+")
_SLASH_FRAC_RE = re.compile(r"^(-?)(\d+)/(\d+)$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TRAILING_ZEROS_RE = re.compile(r"(?<![\d.])(\d+)\.(\d*[1-9])?0+(?![\d.])")
_LEADING_DOT_RE = re.compile(r"(?<![\w}.])\.(\d)")
_RENAMES = (
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\le(?![a-zA-Z])"), r"\\leq"),
    (re.compile(r"\\ge(?![a-zA-Z])"), r"\\geq"),
    (re.compile(r"\\ne(?![a-zA-Z])"), r"\\neq"),
    (re.compile(r"\\varnothing(?![a-zA-Z])"), r"\\emptyset"),
    (re.compile(r"\{bmatrix\}"), "{pmatrix}"),
)


def _read_arg(s: str, i: int) -> tuple[str | None, int]:
    """One macro argument at ``s[i]``: a ``{group}``, a control word or one character."""
    if i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None, i
    if s[i] == "{":
        end = _matching_brace(s, i)
        return (None, i) if end is None else (s[i : end + 1], end + 1)
    if s[i] == "\\":
        word = _CTRL_WORD_RE.match(s, i)
        return (word.group(0), word.end()) if word else (s[i : i + 2], i + 2)
    if s[i].isalnum():
        return s[i], i + 1
    return None, i


def _brace_args(s: str, command: str, n_args: int) -> str:
    """Give every argument of ``command`` braces: ``\\frac12`` -> ``\\frac{1}{2}``."""
    out: list[str] = []
    i = 0
    while (j := s.find(command, i)) >= 0:
        out.append(s[i:j] + command)
        i = j + len(command)
        if i < len(s) and s[i].isalpha():  # a longer control word, e.g. \fracx
            continue
        for _ in range(n_args):
            arg, i = _read_arg(s, i)
            if arg is None:
                break
            out.append(arg if arg.startswith("{") else "{" + arg + "}")
    out.append(s[i:])
    return "".join(out)


def _split_top_level(s: str) -> list[str] | None:
    """Split at commas outside any bracket; None if the brackets do not balance.

    Any of ``( [ { \\{`` opens and any of ``) ] } \\}`` closes, so half-open intervals
    like ``[1,2)`` count as balanced.
    """
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(s):
        c = s[i]
        step = 1
        if c == "\\":
            c = s[i : i + 2]
            step = 2
        if c in ("(", "[", "{", "\\{"):
            depth += 1
        elif c in (")", "]", "}", "\\}"):
            depth -= 1
            if depth < 0:
                return None
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        i += step
    if depth != 0:
        return None
    parts.append(s[start:])
    return parts


def _canonical_set(s: str) -> str:
    """Sort the elements of a whole-string set ``\\{b,a\\}``: sets are unordered."""
    if len(s) < 4 or not (s.startswith("\\{") and s.endswith("\\}")):
        return s
    parts = _split_top_level(s[2:-2])
    if parts is None or not all(parts):
        return s
    return "\\{" + ",".join(sorted(parts)) + "\\}"


def _strip_assignment(s: str) -> str:
    """``x=3`` -> ``3`` and ``x\\in[1,2)`` -> ``[1,2)`` when the right side is a value.

    The right side must hold no free letter (control words like ``\\pi`` are fine) and no
    second ``=``; ``y=2x+1`` stays an equation for math-verify to compare as one.
    """
    m = _ASSIGN_RE.match(s)
    if not m:
        return s
    rhs = m.group(1)
    if "=" in rhs or re.search(r"[a-zA-Z]", _CTRL_WORD_RE.sub("", rhs)):
        return s
    return rhs


def normalize_answer(s: str) -> str:
    """Canonical string form of an answer; equal strings mean equal answers.

    Applied in order; each step only drops what does not change the value in the usual
    reading of a competition answer:

    1. a ``\\boxed{...}`` inside the string is replaced by its content;
    2. math delimiters ``$``, ``\\(..\\)``, ``\\[..\\]`` and dollar signs ``\\$`` go;
    3. unit words (cm, inches, degrees, dollars, units, ...) go when they sit in
       ``\\text{}``/``\\mathrm{}``/``\\mbox{}`` (with an optional ``^2``/``^3``), or as plain
       multi-letter words after ``<number><space>`` at the end; other ``\\text{X}``-like
       wrappers are unwrapped to ``X``;
    4. ``\\left``/``\\right``/``\\big``, ``\\displaystyle``, spacing (``\\!``, ``\\,``,
       ``\\;``, ``\\:``, ``\\ ``, ``~``, ``\\quad``) go; ``{,}`` becomes ``,``;
    5. degree marks (``^\\circ``, ``^{\\circ}``, ``°``) and percent signs (``\\%``, ``%``) go;
    6. spellings unify: ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\le``/``\\ge``/``\\ne`` ->
       ``\\leq``/``\\geq``/``\\neq``, ``\\varnothing`` -> ``\\emptyset``, ``bmatrix`` ->
       ``pmatrix``;
    7. whitespace goes, except one space after a control word followed by a letter
       (``\\pi r`` must not become ``\\pir``);
    8. ``\\sqrt`` and ``\\frac`` arguments get braces: ``\\sqrt2`` -> ``\\sqrt{2}``,
       ``\\frac12`` -> ``\\frac{1}{2}``;
    9. trailing full stops go; a lone choice ``(B)`` or ``B)`` becomes ``B``;
    10. a leading ``x=`` or ``x\\in`` goes when the rest is a value (see
        :func:`_strip_assignment`);
    11. numbers: ``a/b`` -> ``\\frac{a}{b}`` (whole string of integers), thousands
        separators go when the whole string is one number (``1,000`` -> ``1000``, while a
        tuple ``(1,2)`` or list ``1,2`` is kept), trailing decimal zeros go (``2.50`` ->
        ``2.5``, ``3.0`` -> ``3``), a leading dot gets a zero (``.5`` -> ``0.5``);
    12. a whole-string set ``\\{b,a\\}`` has its elements sorted (sets are unordered).

    Case is kept: ``A`` and ``a`` may be different variables.

    Strings longer than :data:`MAX_ANSWER_CHARS` come back only stripped: a few steps
    are quadratic in nesting depth, and no real final answer is that long.
    """
    s = s.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    s = s.replace("\\$", "").replace("$", "")
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    s = _TEXT_UNIT_RE.sub("", s)
    while (unwrapped := _TEXT_WRAP_RE.sub(r"\1", s)) != s:
        s = unwrapped
    s = _PLAIN_UNIT_RE.sub("", s)
    s = _SPACING_RE.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else "", s)
    s = _SIZING_RE.sub("", s)
    s = s.replace("{,}", ",")
    s = _DEGREE_RE.sub("", s).replace("\\%", "").replace("%", "")
    for pattern, replacement in _RENAMES:
        s = pattern.sub(replacement, s)
    s = _CTRL_SPACE_RE.sub("\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = _brace_args(_brace_args(s, "\\sqrt", 1), "\\frac", 2)
    s = s.rstrip(".")
    if choice := _CHOICE_RE.match(s):
        s = choice.group(1)
    s = _strip_assignment(s)
    s = _SLASH_FRAC_RE.sub(r"\1\\frac{\2}{\3}", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _TRAILING_ZEROS_RE.sub(lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), s)
    s = _LEADING_DOT_RE.sub(r"0.\1", s)
    return _canonical_set(s)


# ---------------------------------------------------------------- math-verify (workers)


def _warm_up() -> int:
    """Runs first in every worker: pay the sympy/antlr import once, report the pid."""
    from math_verify import parse

    parse("$1$")
    return os.getpid()


def _parse(text: str, seconds: int) -> list[object]:
    """math-verify parse of ``$text$``; the bare string only if the wrapped one is empty.

    Bare parsing is the fallback, not the first try: on a bare string math-verify
    often extracts a fragment (``(1, 2)`` parses as ``2``) instead of the whole answer.
    """
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=seconds) or parse(text, parsing_timeout=seconds)


def _verify_in_worker(pairs: list[tuple[str, str]], seconds: int) -> bool | None:
    """True/False from math-verify for any (gold, pred) form; None if nothing parsed."""
    from math_verify import verify

    decided = False
    for gold, pred in pairs:
        gold_parsed, pred_parsed = _parse(gold, seconds), _parse(pred, seconds)
        if not gold_parsed or not pred_parsed:
            continue
        decided = True
        if verify(gold_parsed, pred_parsed, timeout_seconds=seconds):
            return True
    return False if decided else None


class _Worker:
    """One single-process pool; killable as a unit without touching other workers."""

    def __init__(self, startup_timeout: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(max_workers=1, mp_context=context)
        self.pid: int | None = None
        try:
            self.pid = self.executor.submit(_warm_up).result(timeout=startup_timeout)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        # The pid comes from the warm-up; if that never answered, fall back to the
        # executor's (private, long-stable) process table.
        if self.pid is not None:
            pids = [self.pid]
        else:
            pids = [p.pid for p in (self.executor._processes or {}).values() if p.pid is not None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class AnswerChecker:
    """Decides whether a predicted answer equals a gold answer; owns the worker processes.

    Fast path in the caller's thread: equal :func:`normalize_answer` forms match, and an
    empty form never does. Otherwise math-verify runs in a worker on the normalised and
    the raw forms (each wrapped as ``$...$``, gold first since ``verify`` is asymmetric).
    When a side parses to nothing, the result is normalised string equality (False by
    then). A worker past the ``timeout`` deadline is killed, the pair scores False, and a
    fresh worker is spawned on next use. Workers are created lazily, at most
    ``max_workers``; waiting for a free one is not counted in ``timeout``.

    Thread-safe. Use as a context manager or call :meth:`close`. Workers are spawned
    (not forked), so a script using this needs the ``if __name__ == "__main__":`` guard;
    without it the first worker fails to start and the call raises ``BrokenProcessPool``.
    """

    def __init__(self, max_workers: int = 2, startup_timeout: float = 120.0) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.startup_timeout = startup_timeout
        self.worker_kills = 0  # workers killed for overrunning a deadline or crashing
        self._closed = False
        self._lock = threading.Lock()
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(max_workers):
            self._slots.put(None)  # None: no process yet, spawn on first use

    def answers_match(self, pred: str, gold: str, timeout: float = 5.0) -> bool:
        """Whether ``pred`` equals ``gold``; False on timeout. Blocks up to ``timeout``."""
        norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
        if not norm_pred or not norm_gold or norm_pred == norm_gold:
            return bool(norm_pred) and norm_pred == norm_gold
        pairs = [(norm_gold, norm_pred)]
        raw_pred, raw_gold = _light_clean(pred), _light_clean(gold)
        if (raw_gold, raw_pred) != (norm_gold, norm_pred):
            pairs.append((raw_gold, raw_pred))
        verdict = self._run_verify(pairs, timeout)
        return verdict if verdict is not None else norm_pred == norm_gold

    async def answers_match_async(self, pred: str, gold: str, timeout: float = 5.0) -> bool:
        """:meth:`answers_match` without blocking the event loop."""
        norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
        if not norm_pred or not norm_gold or norm_pred == norm_gold:
            return bool(norm_pred) and norm_pred == norm_gold
        return await asyncio.to_thread(self.answers_match, pred, gold, timeout)

    def close(self) -> None:
        """Stop all worker processes. Idempotent; later calls to match raise RuntimeError."""
        with self._lock:
            self._closed = True
        drained: list[_Worker | None] = []
        while True:
            try:
                drained.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for worker in drained:
            if worker is not None:
                worker.close()
            self._slots.put(None)  # wakes any waiting caller, which then sees _closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run_verify(self, pairs: list[tuple[str, str]], timeout: float) -> bool | None:
        worker = self._acquire()
        returned: _Worker | None = worker  # what goes back to the pool
        try:
            # math-verify's own per-operation alarm (whole seconds) fires a little before
            # the hard deadline when sympy is interruptible, which spares a respawn.
            inner_seconds = max(1, math.floor(timeout * 0.8))
            future = worker.executor.submit(_verify_in_worker, pairs, inner_seconds)
            return future.result(timeout=timeout)
        except (TimeoutError, BrokenProcessPool) as exc:
            logger.warning("answer check abandoned (%s); killing worker %s", type(exc).__name__, worker.pid)
            worker.kill()
            returned = None
            with self._lock:
                self.worker_kills += 1
            return False
        finally:
            self._release(returned)

    def _acquire(self) -> _Worker:
        worker = self._slots.get()
        if self._closed:
            self._slots.put(worker)
            raise RuntimeError("AnswerChecker is closed")
        if worker is not None:
            return worker
        try:
            return _Worker(self.startup_timeout)
        except BaseException:
            self._slots.put(None)
            raise

    def _release(self, worker: _Worker | None) -> None:
        if self._closed and worker is not None:
            worker.close()
            worker = None
        self._slots.put(worker)


def _light_clean(s: str) -> str:
    """The answer as written, minus a surrounding box and ``$`` signs (for math-verify)."""
    s = s.strip()
    boxed = extract_boxed(s)
    return (boxed if boxed is not None else s).replace("$", "").strip()


# ------------------------------------------------------------------ default instance

_default_checker: AnswerChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> AnswerChecker:
    """The process-wide checker behind :func:`answers_match`, made on first use.

    It is the module's only global state; it is closed at interpreter exit. Code that
    wants its own pool size or lifetime should create an :class:`AnswerChecker`.
    """
    global _default_checker
    with _default_lock:
        if _default_checker is None:
            _default_checker = AnswerChecker()
            atexit.register(_default_checker.close)
        return _default_checker


def answers_match(pred: str, gold: str, timeout: float = 5.0) -> bool:
    """Whether ``pred`` equals ``gold``, via :func:`default_checker`."""
    return default_checker().answers_match(pred, gold, timeout)


async def answers_match_async(pred: str, gold: str, timeout: float = 5.0) -> bool:
    """Async :func:`answers_match`, via :func:`default_checker`."""
    return await default_checker().answers_match_async(pred, gold, timeout)


# ------------------------------------------------------------------------ majority vote


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
