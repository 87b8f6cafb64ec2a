"""`python -m trainer.evaluate --compare BEFORE AFTER` on two hand-built runs with known answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.thor_server import ROOT
from tests.test_eval_metrics import call, record
from trainer.evaluate.records import RecordLog


def _write(run: Path, records) -> Path:
    run.mkdir(parents=True)
    log = RecordLog(run / "records.jsonl")
    for r in records:
        log.append(r)
    return run


def test_compare_reports_accuracy_difference_code_ratio_and_call_success(tmp_path: Path) -> None:
    # before: 1 of 4 right, no code; after: 3 of 4 right, code in 3 trajectories (one call failed, committed)
    before = _write(
        tmp_path / "before",
        [record("b1", f"p{i}", "thor", 0, "1", i == 0) for i in range(4)],
    )
    after = _write(
        tmp_path / "after",
        [
            record("b1", "p0", "thor", 0, "1", True, [call("ok")]),
            record("b1", "p1", "thor", 0, "1", True, [call("ok")]),
            record("b1", "p2", "thor", 0, "1", True),
            record("b1", "p3", "thor", 0, "1", False, [call("error")]),
            # a mode only one run has is not compared
            record("b1", "p9", "cot", 0, None, False, error="boom"),
        ],
    )
    r = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--compare", str(before), str(after)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads((after / "compare.json").read_text())
    [row] = data["rows"]  # only thor is in both runs
    assert row["mode"] == "thor" and row["problems"] == 4
    assert row["before"]["accuracy"]["value"] == 0.25 and row["after"]["accuracy"]["value"] == 0.75
    assert row["accuracy_difference"]["difference"] == 0.5 and row["accuracy_difference"]["paired"] == 4
    assert row["before"]["with_code"] == 0 and row["after"]["with_code"] == 3
    assert row["after"]["calls"] == 3 and abs(row["after"]["call_success"]["value"] - 2 / 3) < 1e-9
    assert row["before"]["call_success"] is None
    assert "| b1 | thor | 4 | 25.0 (" in r.stdout and "+50.0 (" in r.stdout


def test_compare_needs_two_runs(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "b")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "no records.jsonl" in r.stderr
