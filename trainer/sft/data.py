"""The SFT dataset: TIRGen samples (or any dataset of segments) as token ids and labels.

Owns: finding the input (a ``samples.jsonl``, a directory holding one, or a ``datasets``
dataset saved with ``save_to_disk`` that has a ``segments`` column), reading each sample's
segments, tokenising them with `trainer.sft.encode.encode_segments`, dropping (and
counting) sequences longer than the maximum length (never truncating them), and the
counts SFT reports (`DataStats`). Errors name the file, the line or row, and the fix.

Does not own: the tokenisation rules (encode.py), the TIRGen schema (trainer/tirgen/sample.py)
or batching (train.py's collator).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .encode import SegmentError, encode_segments, end_token_id

__all__ = ["SAMPLES_FILE", "DataError", "DataStats", "iter_segment_rows", "load_sft_dataset", "resolve_data_path"]

SAMPLES_FILE = "samples.jsonl"


class DataError(ValueError):
    """The SFT input cannot be used: missing, malformed, or nothing left to train on."""


@dataclass
class DataStats:
    """What happened to the input: read, dropped for length, kept, and token counts of the kept."""

    source: str
    samples_read: int = 0
    dropped_too_long: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    max_length: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_data_path(path: str | Path) -> tuple[Path, str]:
    """(path, kind) with kind ``jsonl`` or ``disk`` (a ``datasets`` save_to_disk directory)."""
    p = Path(path)
    if p.is_file():
        return p, "jsonl"
    if p.is_dir():
        if (p / SAMPLES_FILE).is_file():
            return p / SAMPLES_FILE, "jsonl"
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
            return p, "disk"
        raise DataError(
            f"{p}: a directory with neither {SAMPLES_FILE} nor a saved `datasets` dataset (state.json); "
            "pass a TIRGen output directory, its samples.jsonl, or a Dataset.save_to_disk directory"
        )
    raise DataError(f"{p}: no such SFT data file or directory; run `python -m trainer.tirgen` first or fix --data")


def iter_segment_rows(path: str | Path) -> Iterator[tuple[str, list[Any]]]:
    """(where, segments) for each sample of the input; *where* names the line or row for errors."""
    p, kind = resolve_data_path(path)
    if kind == "jsonl":
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{p}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not JSON ({e}); every line must be one sample object") from e
                if not isinstance(row, dict) or not isinstance(row.get("segments"), list):
                    raise DataError(f"{where}: no 'segments' list; expected a TIRGen sample (trainer.tirgen.sample)")
                yield f"{where} ({row.get('id', 'no id')})", row["segments"]
        return
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{p}: not loadable with datasets.load_from_disk ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{p}: a DatasetDict without a 'train' split (splits: {list(ds)}); save the train split")
        ds = ds["train"]
    if "segments" not in ds.column_names:
        raise DataError(f"{p}: dataset has no 'segments' column (columns: {ds.column_names})")
    ids = ds["id"] if "id" in ds.column_names else None
    for n, segs in enumerate(ds["segments"]):
        yield f"{p} row {n} ({ids[n] if ids is not None else 'no id'})", segs


def training_problem_ids(path: str | Path) -> list[str]:
    """The problem ids (``<source>/<id>``, TirSample.id) of the input's samples, in order, without repeats."""
    p, kind = resolve_data_path(path)
    ids: list[str] = []
    if kind == "jsonl":
        with p.open(encoding="utf-8") as f:
            ids = [str(json.loads(line).get("id")) for line in f if line.strip()]
    else:
        import datasets

        ds = datasets.load_from_disk(str(p))
        ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        ids = [str(i) for i in ds["id"]] if "id" in ds.column_names else []
    return list(dict.fromkeys(i for i in ids if i and i != "None"))


def load_sft_dataset(path: str | Path, tokenizer: Any, max_length: int) -> tuple[Any, DataStats]:
    """A ``datasets.Dataset`` with ``input_ids`` and ``labels`` (plus ``length``), and its stats.

    Sequences longer than *max_length* tokens are dropped and counted, never truncated.
    Raises DataError for a missing input, a malformed sample, or when nothing is left.
    """
    import datasets

    if max_length < 2:
        raise DataError(f"max_length {max_length} is too small: a sequence needs at least a prompt and an end token")
    stats = DataStats(source=str(path), max_length=max_length)
    end = end_token_id(tokenizer)
    rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
    longest_dropped = 0
    for where, segments in iter_segment_rows(path):
        stats.samples_read += 1
        try:
            enc = encode_segments(tokenizer, segments, end_id=end)
        except SegmentError as e:
            raise DataError(f"{where}: {e}") from e
        if len(enc) > max_length:
            stats.dropped_too_long += 1
            longest_dropped = max(longest_dropped, len(enc))
            continue
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
        rows["length"].append(len(enc))
        stats.kept += 1
        stats.tokens += len(enc)
        stats.trained_tokens += enc.trained_tokens
        stats.longest = max(stats.longest, len(enc))
    if stats.samples_read == 0:
        raise DataError(f"{path}: no samples in the SFT input")
    if stats.kept == 0:
        raise DataError(
            f"all {stats.samples_read} samples are longer than --max-length {max_length} tokens "
            f"(longest {longest_dropped}): raise --max-length"
        )
    return datasets.Dataset.from_dict(rows), stats
