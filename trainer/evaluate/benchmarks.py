"""Benchmark loading: the seven named evaluation sets, any JSONL file, any local `datasets` dataset.

Owns: :class:`Problem` (one problem with its gold answer, as the checker compares it),
:data:`BENCHMARKS` (the explicit mapping of each named set in ``shared/data/benchmarks/``:
which file, which fields, how the gold answer is read), :func:`load_benchmark`,
:func:`select` (``--offset``/``--limit``), :func:`default_data_dir` and
:class:`BenchmarkError` (one clear line per bad input: unknown name, missing file, missing
field, empty answer, invalid JSON).

Does not own: prompts (the targets build them from :attr:`Problem.problem`), scoring
(``thor_engine.answer``: normalisation and math-verify decide equality; this module only
hands over the gold answer as a string), sampling, records or metrics.

How gold answers are read (``answer_form`` of a :class:`BenchmarkSpec`):

- ``text``: the field as written (MATH500: ``\\frac{11}{2}``, ``(-\\infty, 2) \\cup (3, \\infty)``).
- ``integer``: AIME and AMC answers are integers stored as ``"025"`` (AIME24), ``70``
  (AIME25) or ``27.0`` (AMC23); an integral number or digit string becomes its plain
  decimal (``"025"`` -> ``"25"``, ``27.0`` -> ``"27"``), anything else is kept as written.
- ``gsm8k``: the text after the last ``#### `` line, thousands separators dropped
  (``1,450,000`` -> ``1450000``).
- ``boxed``: the content of the last ``\\boxed{}`` of a worked solution (Minerva; every
  one of its 272 solutions has exactly one box).
- ``list``: a list of answers (OlympiadBench's ``final_answer``) joined with ``", "``.
- ``auto`` (files given by path): a list is joined, an integral number becomes an integer,
  a text with a ``#### `` line is read GSM8K-style, a text with a ``\\boxed{}`` gives the
  box's content, anything else is kept as written.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from thor_engine.answer import extract_boxed

__all__ = [
    "BENCHMARKS",
    "DATA_DIR_ENV",
    "AnswerForm",
    "BenchmarkError",
    "BenchmarkSpec",
    "Problem",
    "default_data_dir",
    "load_benchmark",
    "select",
]

DATA_DIR_ENV = "THOR_BENCHMARKS_DIR"
"""Environment variable overriding :func:`default_data_dir`."""

AnswerForm = Literal["text", "integer", "gsm8k", "boxed", "list", "auto"]

#: Field names tried, in order, when a file is given by path without explicit fields.
PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "final_answer")
ID_FIELDS = ("unique_id", "id", "idx")

#: File stems that name a split, not a benchmark: ``math500/test.jsonl`` is "math500".
_SPLIT_STEMS = frozenset({"test", "train", "validation", "valid", "val", "dev", "data"})
#: Suffixes read with ``datasets.load_dataset(<format>, data_files=...)``.
_DATASET_FORMATS = {".parquet": "parquet", ".json": "json", ".csv": "csv", ".arrow": "arrow"}

_GSM8K_MARK_RE = re.compile(r"^####\s*(.*?)\s*$", re.MULTILINE)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_INTEGER_RE = re.compile(r"^[-+]?\d+$")


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message is one line naming the problem and the fix."""


class Problem(BaseModel):
    """One problem of a benchmark with its gold answer."""

    model_config = ConfigDict(frozen=True)

    benchmark: str
    id: str = Field(description="The set's own id where it has one, else '<benchmark>-<index>'.")
    index: int = Field(description="0-based row in the file (blank lines not counted).")
    problem: str
    answer: str = Field(description="The gold answer as the checker compares it (see the module docstring).")
    meta: dict[str, Any] = Field(default_factory=dict, description="Subject, level, unit, ... where the set has them.")


class BenchmarkSpec(BaseModel):
    """How one named benchmark is read: its file under the data directory and its fields."""

    model_config = ConfigDict(frozen=True)

    name: str
    file: str = Field(description="Path relative to the benchmarks data directory.")
    problem_field: str
    answer_field: str
    answer_form: AnswerForm
    id_field: str | None = Field(default=None, description="None: ids are '<name>-<index>'.")
    context_field: str | None = Field(default=None, description="Text put before the problem when not empty.")
    meta_fields: tuple[str, ...] = ()


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        # {problem, solution, answer, subject, level}; no unique_id in this copy.
        BenchmarkSpec(
            name="math500",
            file="math500/test.jsonl",
            problem_field="problem",
            answer_field="answer",
            answer_form="text",
            meta_fields=("subject", "level"),
        ),
        # {id: 60..89, problem, question (same text), solution, answer: "025", url}.
        BenchmarkSpec(
            name="aime24",
            file="aime24/test.jsonl",
            problem_field="problem",
            answer_field="answer",
            answer_form="integer",
            id_field="id",
            meta_fields=("url",),
        ),
        # {id: "0".."29", problem, answer: 70}.
        BenchmarkSpec(
            name="aime25",
            file="aime25/test.jsonl",
            problem_field="problem",
            answer_field="answer",
            answer_form="integer",
            id_field="id",
        ),
        # {id, problem, question (same text), answer: 27.0, url}.
        BenchmarkSpec(
            name="amc23",
            file="amc23/test.jsonl",
            problem_field="problem",
            answer_field="answer",
            answer_form="integer",
            id_field="id",
            meta_fields=("url",),
        ),
        # {problem, solution (the answer in its one \boxed{}), type (the course), idx}.
        BenchmarkSpec(
            name="minerva_math",
            file="minerva_math/test.jsonl",
            problem_field="problem",
            answer_field="solution",
            answer_form="boxed",
            id_field="idx",
            meta_fields=("type",),
        ),
        # Qwen2.5-Math's copy (the open-ended, text-only, English maths competition subset):
        # {id, question, context (null), solution: [..], final_answer: [one string],
        # is_multiple_answer, unit, answer_type, error (a tolerance, set on one row), subfield}.
        BenchmarkSpec(
            name="olympiadbench",
            file="olympiadbench/test.jsonl",
            problem_field="question",
            answer_field="final_answer",
            answer_form="list",
            id_field="id",
            context_field="context",
            meta_fields=("subfield", "answer_type", "unit", "is_multiple_answer", "error"),
        ),
        # {question, answer: worked solution ending "#### 70000"}; the first 500 of the test set.
        BenchmarkSpec(
            name="gsm8k",
            file="gsm8k/test.jsonl",
            problem_field="question",
            answer_field="answer",
            answer_form="gsm8k",
        ),
    )
}


def default_data_dir() -> Path:
    """Where the named benchmark sets live: ``$THOR_BENCHMARKS_DIR`` if set; else the first that
    exists of ``$THOR_SHARED_DATA_DIR/benchmarks``, ``shared/data/benchmarks`` beside the
    repository, and the workplace's ``/work/shared/data/benchmarks`` (a clone elsewhere, e.g. CI's);
    else the one beside the repository (the error then names it)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"
    shared = os.environ.get("THOR_SHARED_DATA_DIR")
    candidates = [Path(shared) / "benchmarks"] if shared else []
    candidates += [beside, Path("/work/shared/data/benchmarks")]
    return next((c for c in candidates if c.is_dir()), beside)


# ------------------------------------------------------------------ gold answers


def _number_text(value: Any) -> str | None:
    """An integral int/float as its plain decimal; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return None


def _read_integer(value: Any) -> str:
    if (number := _number_text(value)) is not None:
        return number
    text = str(value).strip()
    if _INTEGER_RE.match(text):
        return str(int(text))
    return text


def _read_gsm8k(value: Any) -> str:
    marks = _GSM8K_MARK_RE.findall(str(value))
    if not marks:
        return ""
    answer = marks[-1]
    return answer.replace(",", "") if _THOUSANDS_RE.match(answer) else answer


def _read_boxed(value: Any) -> str:
    boxed = extract_boxed(str(value))
    return "" if boxed is None else boxed.strip()


def _read_list(value: Any) -> str:
    items = value if isinstance(value, list | tuple) else [value]
    return ", ".join(text for item in items if (text := _read_text(item)))


def _read_text(value: Any) -> str:
    if (number := _number_text(value)) is not None:
        return number
    return str(value).strip()


def _read_auto(value: Any) -> str:
    if isinstance(value, list | tuple):
        return _read_list(value)
    if (number := _number_text(value)) is not None:
        return number
    text = str(value)
    if _GSM8K_MARK_RE.search(text):
        return _read_gsm8k(text)
    if extract_boxed(text) is not None:
        return _read_boxed(text)
    return text.strip()


_READERS: dict[str, Callable[[Any], str]] = {
    "text": _read_text,
    "integer": _read_integer,
    "gsm8k": _read_gsm8k,
    "boxed": _read_boxed,
    "list": _read_list,
    "auto": _read_auto,
}


# ------------------------------------------------------------------ rows


class _Row:
    """One source row and where it came from, for error messages."""

    __slots__ = ("data", "where")

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{path} line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(data, dict):
                raise BenchmarkError(f"{path} line {line_no}: expected a JSON object, got {type(data).__name__}")
            yield _Row(data, f"{path} line {line_no}")


def _dataset_rows(path: Path, split: str) -> Iterator[_Row]:
    import datasets  # heavy import: only for dataset paths

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise BenchmarkError(
                f"{path}: not a dataset saved with save_to_disk ({exc}); give a JSONL file or a save_to_disk directory"
            ) from None
    else:
        try:
            loaded = datasets.load_dataset(_DATASET_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
            raise BenchmarkError(f"{path}: cannot be read as {path.suffix} ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise BenchmarkError(f"{path}: no split {split!r}; it has {sorted(loaded)} (pass --split)")
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise BenchmarkError(f"{path}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    for index, data in enumerate(loaded):
        yield _Row(dict(data), f"{path} row {index}")


def _field_error(row: _Row, field: str, flag: str, what: str = "has no field") -> BenchmarkError:
    return BenchmarkError(f"{row.where}: {what} {field!r} (fields: {sorted(row.data)}); pass {flag} to choose another")


def _pick_field(row: _Row, explicit: str | None, candidates: Sequence[str], flag: str, kind: str) -> str:
    if explicit is not None:
        return explicit
    for name in candidates:
        if name in row.data:
            return name
    raise BenchmarkError(
        f"{row.where}: no {kind} field among {list(candidates)} (fields: {sorted(row.data)}); pass {flag}"
    )


def _build(
    benchmark: str,
    rows: Iterable[_Row],
    *,
    problem_field: str | None,
    answer_field: str | None,
    id_field: str | None,
    answer_form: AnswerForm,
    context_field: str | None = None,
    meta_fields: Sequence[str] | None = None,
    id_explicit: bool = True,
) -> list[Problem]:
    """Problems from rows; fields not given are picked on the first row (see the *_FIELDS tuples).

    ``id_explicit``: ``id_field`` is what the caller chose (None: ids from row indices), so
    a row without it or a repeated id is an error. Otherwise an id field is looked for by
    name, and ids fall back to row indices when it is not unique.
    """
    reader = _READERS[answer_form]
    problems: list[Problem] = []
    sources: list[str] = []
    for index, row in enumerate(rows):
        if index == 0:
            problem_field = _pick_field(row, problem_field, PROBLEM_FIELDS, "--problem-field", "problem")
            answer_field = _pick_field(row, answer_field, ANSWER_FIELDS, "--answer-field", "answer")
            if id_field is None and not id_explicit:
                id_field = next((name for name in ID_FIELDS if name in row.data), None)
        assert problem_field is not None and answer_field is not None
        if problem_field not in row.data:
            raise _field_error(row, problem_field, "--problem-field")
        if answer_field not in row.data:
            raise _field_error(row, answer_field, "--answer-field")
        text = row.data[problem_field]
        if not isinstance(text, str) or not text.strip():
            raise _field_error(row, problem_field, "--problem-field", "empty or non-text problem in field")
        if context_field and isinstance(context := row.data.get(context_field), str) and context.strip():
            text = f"{context.strip()}\n\n{text}"
        raw_answer = row.data[answer_field]
        answer = "" if raw_answer is None else reader(raw_answer)
        if not answer:
            raise _field_error(row, answer_field, "--answer-field", f"no gold answer ({answer_form} form) in field")
        own_id = row.data.get(id_field) if id_field else None
        if id_field and id_explicit and own_id is None:
            raise _field_error(row, id_field, "--id-field")
        if meta_fields is None:
            used = {problem_field, answer_field, id_field, context_field}
            meta = {k: v for k, v in row.data.items() if k not in used and _is_small(v)}
        else:
            meta = {k: row.data[k] for k in meta_fields if k in row.data}
        problems.append(
            Problem(
                benchmark=benchmark,
                id=str(own_id) if own_id is not None else f"{benchmark}-{index}",
                index=index,
                problem=text,
                answer=answer,
                meta=meta,
            )
        )
        sources.append(row.where)
    return _unique_ids(problems, sources, id_field, id_explicit)


def _unique_ids(problems: list[Problem], sources: list[str], id_field: str | None, explicit: bool) -> list[Problem]:
    seen: dict[str, str] = {}
    for problem, where in zip(problems, sources, strict=True):
        if problem.id in seen:
            if not explicit:  # an id-like field found by name but not an id: fall back to row indices
                return [p.model_copy(update={"id": f"{p.benchmark}-{p.index}"}) for p in problems]
            raise BenchmarkError(
                f"{where}: id {problem.id!r} (field {id_field!r}) already used at {seen[problem.id]}; "
                "ids must be unique: pass --id-field with a unique field"
            )
        seen[problem.id] = where
    return problems


def _is_small(value: Any) -> bool:
    """Metadata worth keeping from an unknown file: scalars and short strings, not solutions."""
    return value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 200)


def _name_of(path: Path) -> str:
    """A file's benchmark name: its stem, or its folder's name for ``<set>/test.jsonl``."""
    stem = path.name if path.is_dir() else path.stem
    if stem.lower() in _SPLIT_STEMS and path.resolve().parent.name:
        return path.resolve().parent.name
    return stem


# ------------------------------------------------------------------ public API


def load_benchmark(
    name_or_path: str,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    data_dir: Path | None = None,
    split: str = "test",
) -> list[Problem]:
    """The problems of a named benchmark, a JSONL file, or a local `datasets` dataset.

    ``name_or_path`` is one of :data:`BENCHMARKS` (case-insensitive; read from
    ``data_dir``, default :func:`default_data_dir`), or a path: a ``.jsonl`` file (read
    here, so errors name the line), a directory written by ``Dataset.save_to_disk`` /
    ``DatasetDict.save_to_disk`` (``split`` picks from a DatasetDict), or a ``.parquet``,
    ``.json`` or ``.csv`` file (read with ``datasets.load_dataset``). For a path, fields not
    given are found by name on the first row: the problem in ``problem`` or ``question``,
    the answer in ``answer`` or ``final_answer`` (read in the ``auto`` form), the id in
    ``unique_id``, ``id`` or ``idx`` (row indices when that field is not unique); other
    short fields go to ``meta``. The benchmark name of a path is its stem, or its folder's
    name when the stem is a split name (``math500/test.jsonl`` -> ``math500``).

    Field options apply to paths only: a named benchmark's fields are fixed, and passing
    them with a name raises :class:`BenchmarkError`, as does every bad input.
    """
    key = name_or_path.strip().lower()
    if key in BENCHMARKS:
        if problem_field or answer_field or id_field:
            raise BenchmarkError(
                f"{key!r} is a named benchmark with fixed fields; --problem-field/--answer-field/--id-field "
                "apply to JSONL or dataset paths only"
            )
        spec = BENCHMARKS[key]
        root = data_dir if data_dir is not None else default_data_dir()
        path = root / spec.file
        if not path.is_file():
            raise BenchmarkError(
                f"benchmark {spec.name!r}: {path} not found; set {DATA_DIR_ENV} to the folder holding {spec.file}"
            )
        return _build(
            spec.name,
            _jsonl_rows(path),
            problem_field=spec.problem_field,
            answer_field=spec.answer_field,
            id_field=spec.id_field,
            answer_form=spec.answer_form,
            context_field=spec.context_field,
            meta_fields=spec.meta_fields,
        )

    path = Path(name_or_path).expanduser()
    looks_like_path = path.suffix != "" or "/" in name_or_path or os.sep in name_or_path
    if not path.exists():
        if looks_like_path:
            raise BenchmarkError(f"{path}: no such file or directory")
        raise BenchmarkError(
            f"unknown benchmark {name_or_path!r}: known are {', '.join(BENCHMARKS)}; a JSONL file path works too "
            "(with --problem-field/--answer-field)"
        )
    if path.is_dir():
        rows = _dataset_rows(path, split)
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() in _DATASET_FORMATS:
        rows = _dataset_rows(path, split)
    else:
        raise BenchmarkError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; give .jsonl, .json, .parquet, .csv "
            "or a save_to_disk directory"
        )
    problems = _build(
        _name_of(path),
        rows,
        problem_field=problem_field,
        answer_field=answer_field,
        id_field=id_field,
        answer_form="auto",
        id_explicit=id_field is not None,
    )
    if not problems:
        raise BenchmarkError(f"{path}: no rows")
    return problems


def select(problems: Sequence[Problem], *, offset: int = 0, limit: int | None = None) -> list[Problem]:
    """``problems[offset : offset + limit]`` (all after ``offset`` when ``limit`` is None)."""
    if offset < 0:
        raise BenchmarkError(f"--offset must be 0 or more, got {offset}")
    if limit is not None and limit < 0:
        raise BenchmarkError(f"--limit must be 0 or more, got {limit}")
    end = None if limit is None else offset + limit
    return list(problems[offset:end])
