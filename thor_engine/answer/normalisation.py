"""Answer normalisation: one canonical string per answer, so cosmetic differences vanish.

Owns: :func:`normalize_answer` (boxes, delimiters, units, spacing, spellings, numbers,
sets; see its docstring for the ordered rules) and :data:`MAX_ANSWER_CHARS`. Does not
own: extraction from model text (:mod:`.extraction`), deciding mathematical equality
(:mod:`.verification`) or voting (:mod:`.voting`). Pure functions, no state.
"""

from __future__ import annotations

import re

from .extraction import extract_boxed, matching_brace

__all__ = ["MAX_ANSWER_CHARS", "normalize_answer"]

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
    _UNIT_CMDS + r"\s*\{(?:\s|~|\\[,;: ])*(?:" + _UNITS + r")\s*\}(?:\s*\^\s*\{?\s*[23]\s*\}?)?",
    re.IGNORECASE,
)
# A number (decimal, e-notation, "a \times 10^{b}", or an integer fraction) followed only by
# upright-text blocks: those are its units, whatever they say (Minerva: 4.5 \times 10^{33}
# \mathrm{ergs} \mathrm{s}^{-1}, 20 \mathrm{~km} / \mathrm{s}). Only whole strings match.
_NUMBER_PAT = (
    r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
    r"(?:\s*\\(?:times|cdot)\s*10\s*\^\s*(?:\{\s*[-+]?\d+\s*\}|\d))?"
    r"|[-+]?\\[dt]?frac\s*\{\s*[-+]?\d+\s*\}\s*\{\s*\d+\s*\}"
)
# Each block is an atomic group, so a string that fails to match fails in linear time.
_UNIT_TAIL_RE = re.compile(
    r"^\s*(" + _NUMBER_PAT + r")"
    r"(?>(?:\s*(?:/|\\cdot|\\[,;: ]|~))?\s*" + _UNIT_CMDS + r"\s*\{[^{}]*\}(?:\s*\^\s*(?:\{\s*-?\d+\s*\}|-?\d))?)+"
    r"\s*(?:\.\s*)?$"
)
_TEXT_WRAP_RE = re.compile(_TEXT_CMDS + r"\s*\{([^{}]*)\}")
_PLAIN_UNIT_RE = re.compile(
    r"(?<=[\d}])\s+(?:(?:square|sq\.?|cubic)\s+)?(?:"
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
_DOT_BEFORE_SLASH_RE = re.compile(r"(?<![\d.])(\d+)\.(?=/)")  # Python's "-1./3"
_E_NOTATION_RE = re.compile(r"^([-+]?)(\d+(?:\.\d*)?|\.\d+)[eE]\+?(-?)(\d+)$")
_CODE_FUNC_RE = re.compile(r"(?<![\w.\\])(?:np|numpy|math|sp|sympy)\.(arcsin|arccos|arctan|sin|cos|tan|exp|log|pi)\b")
_ONE_CHAR_SCRIPT_RE = re.compile(r"([_^])\{([a-zA-Z0-9])\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_TRAILING_ZEROS_RE = re.compile(r"(?<![\d.])(\d+)\.(\d*[1-9])?0+(?![\d.])")
_LEADING_DOT_RE = re.compile(r"(?<![\w}.])\.(\d)")
_RENAMES = (
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\le(?:qslant)?(?![a-zA-Z])"), r"\\leq"),
    (re.compile(r"\\ge(?:qslant)?(?![a-zA-Z])"), r"\\geq"),
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
        end = matching_brace(s, i)
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


_REL = r"(<|>|\\leq|\\geq|\\lt|\\gt)"
_ONE_SIDED_RE = re.compile(r"^([a-zA-Z])" + _REL + r"(.+)$")
_ONE_SIDED_REVERSED_RE = re.compile(r"^(.+?)" + _REL + r" ?([a-zA-Z])$")
_TWO_SIDED_RE = re.compile(r"^(.+?)(<|\\leq|\\lt) ?([a-zA-Z])(<|\\leq|\\lt)(.+)$")
_FLIP = {"<": ">", ">": "<", "\\leq": "\\geq", "\\geq": "\\leq", "\\lt": ">", "\\gt": "<"}


def _is_value(s: str) -> bool:
    """No free letter (control words such as ``\\pi`` or ``\\infty`` are fine) and no relation."""
    return bool(s) and not re.search(r"[a-zA-Z<>=]", _CTRL_WORD_RE.sub("", s)) and "\\leq" not in s and "\\geq" not in s


def _inequality_to_interval(s: str) -> str:
    """A one-variable inequality as the interval it describes: ``x<-5`` -> ``(-\\infty,-5)``.

    ``x\\geq 3`` -> ``[3,\\infty)``, ``-2\\leq x\\leq 7`` -> ``[-2,7]``, ``5>x`` -> ``(-\\infty,5)``;
    only when the bounds are values (see :func:`_is_value`). The variable's name is dropped:
    the answer is the set.
    """
    if m := _TWO_SIDED_RE.match(s):
        low, rel_low, _, rel_high, high = m.groups()
        if _is_value(low) and _is_value(high):
            return (
                ("(" if rel_low in ("<", "\\lt") else "[")
                + f"{low},{high}"
                + (")" if rel_high in ("<", "\\lt") else "]")
            )
        return s
    if m := _ONE_SIDED_RE.match(s):
        rel, bound = m[2], m[3]
    elif m := _ONE_SIDED_REVERSED_RE.match(s):
        bound, rel = m[1], _FLIP[m[2]]
    else:
        return s
    if not _is_value(bound):
        return s
    if rel in ("<", "\\lt"):
        return f"(-\\infty,{bound})"
    if rel == "\\leq":
        return f"(-\\infty,{bound}]"
    if rel in (">", "\\gt"):
        return f"({bound},\\infty)"
    return f"[{bound},\\infty)"


def _e_notation_to_latex(m: re.Match[str]) -> str:
    """``4.5e33`` -> ``4.5\\times10^{33}``, ``1e-5`` -> ``1\\times10^{-5}`` (math-verify reads no e-notation)."""
    exponent = m[3] + (m[4].lstrip("0") or "0")
    return f"{m[1]}{m[2].rstrip('.')}\\times10^" + (exponent if len(exponent) == 1 else "{" + exponent + "}")


def normalize_answer(s: str) -> str:
    """Canonical string form of an answer; equal strings mean equal answers.

    Applied in order; each step only drops what does not change the value in the usual
    reading of a competition answer:

    1. a ``\\boxed{...}`` inside the string is replaced by its content;
    2. math delimiters ``$``, ``\\(..\\)``, ``\\[..\\]`` and dollar signs ``\\$`` go;
    3. a number (decimal, e-notation, ``a\\times10^{b}`` or an integer fraction) followed
       only by ``\\text{}``/``\\mathrm{}``/``\\mbox{}`` blocks (with exponents, ``/`` or
       ``\\cdot`` between) keeps just the number: the blocks are its units, whatever they
       say (``4.5 \\times 10^{33} \\mathrm{ergs} \\mathrm{s}^{-1}``); unit words (cm, inches,
       degrees, dollars, units, ...) go when they sit in such a block (``\\mathrm{~cm}``
       too, with an optional ``^2``/``^3``), or as plain multi-letter words, optionally
       after ``square``/``sq``/``cubic``, after ``<number><space>`` at the end; other
       ``\\text{X}``-like wrappers are unwrapped to ``X``;
    4. ``\\left``/``\\right``/``\\big``, ``\\displaystyle``, spacing (``\\!``, ``\\,``,
       ``\\;``, ``\\:``, ``\\ ``, ``~``, ``\\quad``) go; ``{,}`` becomes ``,``;
    5. degree marks (``^\\circ``, ``^{\\circ}``, ``°``) and percent signs (``\\%``, ``%``) go;
    6. spellings unify: ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\le``/``\\ge``/``\\ne`` (and
       ``\\leqslant``/``\\geqslant``) -> ``\\leq``/``\\geq``/``\\neq``, ``\\varnothing`` ->
       ``\\emptyset``, ``bmatrix`` -> ``pmatrix``, code's ``np.arcsin`` (also ``numpy.``,
       ``math.``, ``sympy.``; a few functions) -> ``\\arcsin``;
    7. whitespace goes, except one space after a control word followed by a letter
       (``\\pi r`` must not become ``\\pir``);
    8. ``\\sqrt`` and ``\\frac`` arguments get braces: ``\\sqrt2`` -> ``\\sqrt{2}``,
       ``\\frac12`` -> ``\\frac{1}{2}``; a one-character sub- or superscript loses its
       braces (``E_{1}`` -> ``E_1``, ``x^{2}`` -> ``x^2``);
    9. trailing full stops go; a lone choice ``(B)`` or ``B)`` becomes ``B``;
    10. a leading ``x=`` or ``x\\in`` goes when the rest is a value (see
        :func:`_strip_assignment`); a one-variable inequality becomes its interval
        (``x<-5`` -> ``(-\\infty,-5)``, ``-2\\leq x\\leq7`` -> ``[-2,7]``; see
        :func:`_inequality_to_interval`);
    11. numbers: ``a/b`` -> ``\\frac{a}{b}`` (whole string of integers; code's ``-1./3``
        too), a whole-string e-notation number becomes LaTeX (``4.5e33`` ->
        ``4.5\\times10^{33}``, ``1e-5`` -> ``1\\times10^{-5}``; so a whole answer ``2e-1``
        reads as 0.2, not 2e - 1), thousands
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
    if (s.startswith("\\(") and s.endswith("\\)")) or (s.startswith("\\[") and s.endswith("\\]")):
        s = s[2:-2]
    s = _UNIT_TAIL_RE.sub(r"\1", s)
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
    s = _CODE_FUNC_RE.sub(r"\\\1", s)
    s = _CTRL_SPACE_RE.sub("\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = _brace_args(_brace_args(s, "\\sqrt", 1), "\\frac", 2)
    s = _ONE_CHAR_SCRIPT_RE.sub(r"\1\2", s)
    s = s.rstrip(".")
    if choice := _CHOICE_RE.match(s):
        s = choice.group(1)
    s = _strip_assignment(s)
    s = _inequality_to_interval(s)
    s = _DOT_BEFORE_SLASH_RE.sub(r"\1", s)
    s = _SLASH_FRAC_RE.sub(r"\1\\frac{\2}{\3}", s)
    s = _E_NOTATION_RE.sub(_e_notation_to_latex, s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _TRAILING_ZEROS_RE.sub(lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), s)
    s = _LEADING_DOT_RE.sub(r"0.\1", s)
    return _canonical_set(s)
