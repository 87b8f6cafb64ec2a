"""The evaluation reports (trainer/evaluate/report.py) on the hand-built run of test_eval_metrics.

The Markdown must carry the numbers worked out by hand there (as percentages with one
decimal), the PNGs must be real images with the bars drawn, and summary.json must
round-trip to the same `Summary`.
"""
# ruff: noqa: RUF001, RUF003  (the report prints en dashes, minus signs and em dashes on purpose)

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from tests.test_eval_metrics import record, run_records
from trainer.evaluate.metrics import Summary, summarise
from trainer.evaluate.report import plot_accuracy, plot_key_insight, render_markdown, write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# matplotlib's default colour cycle: the first three series (cot, thor, third group)
BLUE, ORANGE, GREEN = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)


@pytest.fixture(scope="module")
def summary() -> Summary:
    return summarise(run_records(), modes=["cot", "thor", "tir-ref"], resamples=2000)


@pytest.fixture(scope="module")
def markdown(summary: Summary) -> str:
    return render_markdown(summary, title="Hand-built run")


def _section(md: str, heading: str) -> str:
    start = md.index(f"## {heading}")
    end = md.find("\n## ", start + 1)
    return md[start : end if end != -1 else len(md)]


def test_markdown_main_table_in_the_papers_layout(markdown: str) -> None:
    assert markdown.startswith("# Hand-built run\n")
    avg = _section(markdown, "Avg@2 (%)")
    assert "| Mode | b1 | b2 | Avg |" in avg
    # b1 cot: per-problem [.5, 0] -> resample means in {0, .25, .5}; b2 cot: [1, 0, .5] -> a 1/27 chance of all-0 or all-1
    assert "| cot | 25.0 (0.0–50.0) | 50.0 (0.0–100.0) | 37.5 (" in avg
    assert "| thor | 75.0 (50.0–100.0) | 66.7 (" in avg and "| 70.8 (" in avg
    assert "| tir-ref | — | — | — |" in avg
    assert "Problems per benchmark: b1 2, b2 3." in avg
    assert "No records for: b1/tir-ref, b2/tir-ref." in avg


def test_markdown_maj_and_pass_tables(markdown: str) -> None:
    maj = _section(markdown, "maj@2 (%)")
    assert "| cot | 50.0 (0.0–100.0) | 33.3 (0.0–100.0) | 41.7 (" in maj
    assert "| thor | 100.0 (100.0–100.0) | 100.0 (100.0–100.0) | 100.0 (100.0–100.0) |" in maj
    pas = _section(markdown, "pass@2 (%)")
    assert "| cot | 50.0 (0.0–100.0) | 66.7 (0.0–100.0) | 58.3 (" in pas
    assert "pass@1 equals Avg@2" in pas


def test_markdown_paired_differences(markdown: str) -> None:
    diff = _section(markdown, "Paired differences of Avg@2 (percentage points)")
    row = next(line for line in diff.splitlines() if line.startswith("| thor − cot |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "**+50.0** (+50.0 to +50.0), ≤0: 0.0%"  # b1: a constant +.5: bold
    assert cells[2].startswith("+16.7 (0.0 to +50.0), ≤0: ")  # b2: includes 0: not bold
    assert cells[3].startswith("**+33.3** (+25.0 to +50.0)")
    assert "| tir-ref − cot | — | — | — |" in diff
    assert "thor vs cot: +33.3 points over 5 paired problems; the interval excludes 0: thor is better" in diff
    assert "tir-ref and cot share no problem" in diff


def test_markdown_key_insight(markdown: str) -> None:
    ki = _section(markdown, "Key insight")
    # Wilson 4/4: 51.0–100.0; 2/3: 20.8–93.9; 1/2: 9.5–90.5
    assert "| thor | every attempt | n=4: 100.0 (51.0–100.0) | n=3: 66.7 (20.8–93.9) | n=2: 50.0 (9.5–90.5) |" in ki
    assert "| thor | committed only | n=5: 100.0 (56.6–100.0) | n=2: 50.0 (9.5–90.5) | n=2: 50.0 (9.5–90.5) |" in ki
    assert "| cot | every attempt | n=0: — | n=0: — | n=10: 40.0 (16.8–68.7) |" in ki
    assert "left out (1)" in ki
    assert "thor: right in 100.0% of trajectories whose calls all succeeded (n=4) vs 66.7%" in ki
    assert "| b2 | thor | n=3: 100.0 (43.9–100.0) | n=1: 100.0 (20.7–100.0) | n=1: 0.0 (0.0–79.3) |" in ki


def test_markdown_tools_tokens_finish_reasons(markdown: str) -> None:
    tools = _section(markdown, "Tool statistics")
    assert "| b1 | thor | 2.00 | 1.00 | 50.0 | 66.7 | 0.25 | 7.5 | 0.50 | 1 | ok 2, error 2 |" in tools
    assert "| b2 | thor | 1.67 | 0.83 | 80.0 | 80.0 | 0.00 | 0.0 | 0.42 | 0 | ok 4, timeout 1 |" in tools
    assert "| b1 | cot | 0.00 | 0.00 | — | — | 0.00 | 0.0 | 0.00 | 0 | — |" in tools
    usage = _section(markdown, "Tokens and wall time per sample")
    assert "| b1 | thor | 2 | 4 | 50.0 | 100.0 | 107.5 | 0.0 | 2.00 |" in usage
    assert "| b1 | cot | 2 | 4 | 50.0 | 100.0 | 100.0 | 0.0 | 2.50 |" in usage
    finish = _section(markdown, "Finish reasons and errors")
    assert "| b1 | cot | stop 3, length 1 | 0 |" in finish
    assert "| b2 | thor | stop 5, error 1 | 1 |" in finish
    assert "- b2/thor (1 sample): engine died" in finish


def _tables(markdown: str) -> list[list[str]]:
    """The Markdown's tables: runs of consecutive lines that start with a pipe."""
    tables: list[list[str]] = []
    previous_in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous_in_table:
                tables.append([])
            tables[-1].append(line)
        previous_in_table = line.startswith("|")
    return tables


def _assert_well_formed(markdown: str) -> None:
    """Every row of a table has as many cells as its header (unescaped pipes counted)."""
    for table in _tables(markdown):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
        assert len(widths) == 1, table
        assert re.fullmatch(r"\|(-{3}:?\|)+", table[1]), table[1]


def test_markdown_tables_are_well_formed(markdown: str) -> None:
    assert len(_tables(markdown)) == 9  # Avg, maj, pass, differences, key insight x2, tools, tokens, finish
    _assert_well_formed(markdown)


def test_markdown_escapes_pipes_and_newlines_from_the_data() -> None:
    records = [
        record("b|x", "p0", "m|1", 0, "1", True),
        record("b|x", "p1", "m|1", 0, None, False, error="bad | thing\nsecond line"),
    ]
    md = render_markdown(summarise(records, resamples=100))
    assert "| Mode | b\\|x | Avg |" in md
    assert "| m\\|1 | 50.0 (" in md
    assert "bad \\| thing second line" in md
    _assert_well_formed(md)


def _colour_pixels(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    target = np.array(rgb) / 255.0
    return int(np.sum(np.all(np.abs(img[..., :3] - target) < 0.02, axis=-1)))


def test_write_reports_writes_every_file_atomically(summary: Summary, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_reports(summary, out)
    assert [p.name for p in paths] == ["summary.json", "table.md", "accuracy.png", "key_insight.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp file left
    assert Summary.model_validate_json(paths[0].read_text(encoding="utf-8")) == summary
    assert paths[1].read_text(encoding="utf-8") == render_markdown(summary)
    for png in paths[2:]:
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 15_000
        img = imread(png)
        assert img.ndim == 3 and img.shape[2] in (3, 4)
        assert img.shape[0] >= 400 and img.shape[1] >= 600
    # accuracy: cot (blue) and thor (orange) bars drawn; tir-ref only has its legend patch
    acc = imread(paths[2])
    assert _colour_pixels(acc, BLUE) > 5_000 and _colour_pixels(acc, ORANGE) > 5_000
    assert _colour_pixels(acc, GREEN) < 1_000
    # key insight: three groups drawn (all succeeded, some failed, no calls)
    ki = imread(paths[3])
    assert min(_colour_pixels(ki, c) for c in (BLUE, ORANGE, GREEN)) > 5_000
    # a second write replaces the files in place
    assert write_reports(summary, out) == paths
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)


def test_accuracy_bars_scale_with_the_values(tmp_path: Path) -> None:
    """thor's bars are taller than cot's in the hand-built run: more orange than blue is drawn."""
    s = summarise(run_records(), modes=["cot", "thor"], resamples=200)
    plot_accuracy(s, tmp_path / "a.png")
    img = imread(tmp_path / "a.png")
    blue, orange = _colour_pixels(img, BLUE), _colour_pixels(img, ORANGE)
    # Avg@2 cot: 25, 50, 37.5 (sum 112.5); thor: 75, 66.7, 70.8 (sum 212.5): areas in that ratio, +- the legend
    assert orange / blue == pytest.approx(212.5 / 112.5, rel=0.1)


def test_reports_of_an_empty_run(tmp_path: Path) -> None:
    s = summarise([])
    md = render_markdown(s)
    assert "0 samples" in md and "modes: none" in md
    plot_accuracy(s, tmp_path / "a.png")
    plot_key_insight(s, tmp_path / "k.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "k.png").read_bytes()[:8] == PNG_MAGIC
