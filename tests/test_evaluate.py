"""`python -m trainer.evaluate` end to end: the tiny TIR model through the real decoder, vLLM and
sandbox, in process and through a live THOR server; every output file; `--resume` after a
killed run; bad input answered with one line and nothing written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.thor_server import ROOT
from tests.support.tiny_tir_model import TIR_PROBLEMS

pytestmark = pytest.mark.timeout(900)

MODES = "thor,thor-nosc,cot,thor-json"
TOOL_PROBLEMS = {p.name for p in TIR_PROBLEMS if p.kind in ("single", "two_call")}


def evaluate(*args: str, timeout: float = 600, **popen: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,  # type: ignore[arg-type]
    )


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's memorised problems as a custom JSONL benchmark (fields q / gold / name)."""
    path = tmp_path_factory.mktemp("bench") / "tiny.jsonl"
    path.write_text("".join(json.dumps({"name": p.name, "q": p.prompt, "gold": p.answer}) + "\n" for p in TIR_PROBLEMS))
    return path


def custom(problems_file: Path) -> list[str]:
    return ["--benchmarks", str(problems_file), "--problem-field", "q", "--answer-field", "gold", "--id-field", "name"]


@pytest.fixture(scope="module")
def in_process_run(tiny_tir_model: Path, sandbox, problems_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    r = evaluate(
        "--model", str(tiny_tir_model), *custom(problems_file), "--modes", MODES, "--k", "2", "--temperature", "0",
        "--max-tokens", "320", "--max-model-len", "2048", "--sandbox-url", sandbox.url, "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_in_process_run_writes_every_output(in_process_run: Path) -> None:
    out = in_process_run
    recs = records(out)
    keys = Counter((r["benchmark"], r["problem_id"], r["mode"], r["sample"]) for r in recs)
    assert len(keys) == len(TIR_PROBLEMS) * 4 * 2 and set(keys.values()) == {1}
    assert {r["target"] for r in recs} == {"in-process"} and {r["benchmark"] for r in recs} == {"tiny"}
    for r in recs:
        assert r["prompt"][-1] == {
            "role": "user",
            "content": next(p.prompt for p in TIR_PROBLEMS if p.name == r["problem_id"]),
        }
        if r["mode"] == "cot":
            assert r["prompt"][0]["role"] == "system" and "step by step" in r["prompt"][0]["content"]
            assert r["tool_calls"] == [] and r["tools"]["calls"] == 0  # no tools: nothing ran
        elif r["mode"] == "thor-json" and r["problem_id"] in TOOL_PROBLEMS:
            # the memorised trajectory ran, then the answer under the constraint: the JSON's `answer` is
            # the one scored (this model never learnt to write it: any integer, or none if cut by length)
            p = next(p for p in TIR_PROBLEMS if p.name == r["problem_id"])
            assert [c["code"] for c in r["tool_calls"]] == p.code_blocks
            head, _, answer = r["text"].partition("\n\nFinal answer, as one line of JSON matching the schema `answer`")
            assert head == p.completion and answer.count("```json\n") == 1, r["text"]
            assert r["answer"] is None or r["answer"].lstrip("-").isdigit(), r["answer"]
            assert r["answer"] is None or f'{{"answer":{r["answer"]}}}' in answer, r["text"]
        elif r["problem_id"] in TOOL_PROBLEMS:
            # the memorised trajectory: real sandbox runs, the answer from the real output
            p = next(p for p in TIR_PROBLEMS if p.name == r["problem_id"])
            assert r["correct"] and r["answer"] == p.answer, r["text"]
            assert [c["code"] for c in r["tool_calls"]] == p.code_blocks
            assert all(c["ok"] and c["committed"] and c["outcome"] == "ok" for c in r["tool_calls"])
            assert r["text"] == p.completion
            assert r["usage"]["completion_tokens"] > 0 and r["wall_s"] > 0
    divzero = [r for r in recs if r["problem_id"] == "divzero" and r["mode"] == "thor-nosc"]
    assert divzero and all(not r["tool_calls"][0]["ok"] and r["tool_calls"][0]["committed"] for r in divzero)

    summary = json.loads((out / "summary.json").read_text())
    table = (out / "table.md").read_text()
    for mode in MODES.split(","):
        mine = [r for r in recs if r["mode"] == mode]
        by_problem: dict[str, list[bool]] = {}
        for r in mine:
            by_problem.setdefault(r["problem_id"], []).append(r["correct"])
        avg = sum(sum(v) / len(v) for v in by_problem.values()) / len(by_problem)
        res = next(x for x in summary["results"] if x["mode"] == mode and x["benchmark"] == "tiny")
        assert res["avg_at_k"]["value"] == pytest.approx(avg)
        assert f"| {mode} |" in table
    spec = json.loads((out / "run.json").read_text())
    assert (
        spec["spec"]["modes"] == MODES.split(",")
        and spec["spec"]["k"] == 2
        and spec["runs"][-1]["samples"] == len(recs)
    )
    for png in ("accuracy.png", "key_insight.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.long  # two evaluation runs against the live server, one SIGKILLed: `make test-long`
def test_resume_after_a_killed_run_redoes_nothing(tiny_server, problems_file: Path, tmp_path) -> None:
    # against the shared live server: the harness's records and resume are the same for every target,
    # and no engine loads twice (the in-process target is `in_process_run`'s)
    out = tmp_path / "run"
    args = [
        "--endpoint", tiny_server.url, *custom(problems_file), "--modes", "thor,cot", "--k", "3", "--temperature", "0",
        "--max-tokens", "320", "--out", str(out), "--concurrency", "1",
    ]  # fmt: skip
    total = len(TIR_PROBLEMS) * 2 * 3
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TQDM_DISABLE": "1"}
    errlog = tmp_path / "stderr.log"
    with errlog.open("w") as err:  # a file, not a pipe: vLLM's log lines must never block the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.evaluate", *args], cwd=ROOT, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        # 4 complete records (a line is complete once its newline is written: a torn 5th may follow)
        while not ((out / "records.jsonl").exists() and (out / "records.jsonl").read_bytes().count(b"\n") >= 4):
            assert proc.poll() is None, errlog.read_text()[-3000:]
            assert time.monotonic() < deadline, "no records after 600 s:\n" + errlog.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: the harness and anything it started
        proc.wait()
    done_before = len(records(out)) if (out / "records.jsonl").read_bytes().endswith(b"\n") else None
    assert done_before is None or done_before < total, "the run finished before it was killed"

    again = evaluate(*args, "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    recs = records(out)
    keys = Counter((r["problem_id"], r["mode"], r["sample"]) for r in recs)
    assert len(keys) == total and set(keys.values()) == {1}, "a sample was redone or lost"
    runs = json.loads((out / "run.json").read_text())["runs"]
    assert len(runs) == 2 and runs[1]["skipped"] + runs[1]["todo"] == total
    assert runs[1]["skipped"] == len(recs) - runs[1]["samples"] >= 4
    assert (out / "summary.json").exists() and (out / "table.md").exists()


def test_through_a_live_thor_server_matches_in_process(
    tiny_server, tiny_tir_model: Path, sandbox, problems_file: Path, in_process_run: Path, tmp_path
) -> None:
    out, client_out = tmp_path / "run", tmp_path / "client"
    r = evaluate(
        "--endpoint", tiny_server.url, *custom(problems_file), "--modes", "thor,thor-nosc,thor-json", "--k", "1",
        "--max-tokens", "320", "--out", str(out),
    )  # fmt: skip
    # the same server's plain /v1/completions, the THOR loop run here (as for any vLLM server)
    client = evaluate(
        "--endpoint", tiny_server.url, "--endpoint-kind", "completions", "--tokenizer", str(tiny_tir_model),
        *custom(problems_file), "--modes", "thor-nosc", "--k", "1", "--max-tokens", "320",
        "--sandbox-url", sandbox.url, "--out", str(client_out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert client.returncode == 0, client.stderr[-4000:]
    client_recs = records(client_out)
    assert {x["target"] for x in client_recs} == {"openai-completions"} and len(client_recs) == len(TIR_PROBLEMS)
    local_nosc = {x["problem_id"]: x for x in records(in_process_run) if x["sample"] == 0 and x["mode"] == "thor-nosc"}
    for rec in client_recs:
        mine = local_nosc[rec["problem_id"]]
        assert (rec["text"], rec["answer"], rec["correct"]) == (mine["text"], mine["answer"], mine["correct"])
    remote = {(x["problem_id"], x["mode"]): x for x in records(out)}
    local = {(x["problem_id"], x["mode"]): x for x in records(in_process_run) if x["sample"] == 0}
    assert {x["target"] for x in remote.values()} == {"thor-server"} and len(remote) == len(TIR_PROBLEMS) * 3
    for key, rec in remote.items():
        if key[0] not in TOOL_PROBLEMS and key[1] in ("thor", "thor-json"):
            continue  # self-correction resamples at temperature: not comparable sample for sample
        mine = local[key]
        assert rec["text"] == mine["text"] and rec["answer"] == mine["answer"] and rec["correct"] == mine["correct"]
        assert [(c["code"], c["ok"], c["outcome"]) for c in rec["tool_calls"]] == [
            (c["code"], c["ok"], c["outcome"]) for c in mine["tool_calls"]
        ]
        assert rec["usage"]["completion_tokens"] == mine["usage"]["completion_tokens"]
    assert (out / "table.md").exists() and (out / "accuracy.png").exists()


# --- bad input: one line, non-zero exit, nothing written ----------------------------------


def _one_error_line(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unknown_benchmark(tmp_path) -> None:
    r = evaluate("--benchmarks", "gsm8k,nosuchbench", "--out", str(tmp_path / "o"), timeout=120)
    _one_error_line(r, 2, "nosuchbench", "gsm8k")
    assert not (tmp_path / "o").exists()


def test_missing_field(tmp_path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    r = evaluate("--benchmarks", str(f), "--answer-field", "answer", "--out", str(tmp_path / "o"), timeout=120)
    _one_error_line(r, 2, "answer", "--answer-field")
    assert not (tmp_path / "o").exists()


def test_unreachable_endpoint(tmp_path) -> None:
    r = evaluate("--endpoint", f"http://127.0.0.1:{_free_port()}", "--benchmarks", "gsm8k", "--limit", "2",
                 "--out", str(tmp_path / "o"), timeout=120)  # fmt: skip
    _one_error_line(r, 1, "unreachable")
    assert not (tmp_path / "o").exists()


def test_model_that_does_not_exist(tmp_path) -> None:
    r = evaluate("--model", str(tmp_path / "no-such-model"), "--benchmarks", "gsm8k", "--limit", "2",
                 "--out", str(tmp_path / "o"), timeout=120)  # fmt: skip
    _one_error_line(r, 1, "does not exist")
    assert not (tmp_path / "o").exists()


def test_bad_flags_and_a_used_run_directory(tmp_path, in_process_run: Path) -> None:
    _one_error_line(evaluate("--modes", "thor,magic", timeout=120), 2, "magic")
    _one_error_line(evaluate("--k", "0", timeout=120), 2, "--k")
    before = (in_process_run / "records.jsonl").read_bytes()
    # records there already, no --resume: refused before any model is loaded
    r = evaluate(
        "--model", "default", "--benchmarks", "gsm8k", "--limit", "1", "--out", str(in_process_run), timeout=300
    )
    assert r.returncode == 2 and "--resume" in r.stderr.splitlines()[-1]
    assert (in_process_run / "records.jsonl").read_bytes() == before


def test_rescore_after_a_scoring_fix(tmp_path) -> None:
    """`--report-only --rescore` scores stored answers again with today's checker and rewrites only what changed."""
    from trainer.evaluate.records import RecordLog, SampleRecord

    out = tmp_path / "run"
    out.mkdir()
    log = RecordLog(out / "records.jsonl")
    base = {"benchmark": "b", "mode": "cot", "sample": 0, "model": "m", "target": "in-process", "prompt": [],
            "text": "", "finish_reason": "stop", "wall_s": 1.0}  # fmt: skip
    log.append(SampleRecord(**base, problem_id="p0", problem_index=0, answer="\\frac{1}{2}", gold="0.5", correct=False))
    log.append(SampleRecord(**base, problem_id="p1", problem_index=1, answer="3", gold="4", correct=True))
    log.append(SampleRecord(**base, problem_id="p2", problem_index=2, answer=None, gold="4", correct=False))
    r = evaluate("--report-only", "--rescore", "--out", str(out), "--modes", "cot", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rescored 3 records: 2 changed" in r.stderr
    assert [x["correct"] for x in records(out)] == [True, False, False]
    assert "| cot |" in (out / "table.md").read_text() and (out / "summary.json").exists()


@pytest.mark.parametrize(
    "content,answer",
    [
        ('{"answer":56211}', "56211"),
        ('{"answer": -3}', "-3"),
        ('{"answer":"1/2"}', "1/2"),
        ("{}", None),
        ('{"answer":null}', None),
        ('{"answer":[1]}', None),
        ("[1]", None),
        ('{"answer":56', None),  # cut by max_tokens
        ("The answer is 5.", None),
    ],
)
def test_a_json_answer_is_read_from_its_answer_field(content: str, answer: str | None) -> None:
    from trainer.evaluate.modes import INTEGER_ANSWER, MODES

    for name in ("thor-json", "json"):
        mode = MODES[name]
        assert mode.structured_answer(content) == answer
        assert mode.response_format == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": INTEGER_ANSWER},
        }
