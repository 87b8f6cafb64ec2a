"""`python -m trainer.rl` end to end: the arithmetic task's cold-started tiny model, real vLLM,
the real sandbox, the learner, weight sync with its probe, checkpoints, resume, the server.

Everything runs as a user would run it (subprocesses of the real commands). The cold start
(`python -m trainer.arith build` + `python -m trainer.sft`) is cached under .cache/rl-test
(git-ignored) by the arguments that made it.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.support.thor_server import run_server, tiny_server_args
from trainer.arith.build import build_task

# a test's bound covers its fixtures: on a fresh clone the first test also builds the cold start (1200 SFT steps,
# ~4 minutes on 2 quiet cores, more beside the other test worker) before its own RL runs
pytestmark = [pytest.mark.vllm, pytest.mark.sandbox, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "rl-test"
DEMO = ROOT / "trainer" / "configs" / "rl" / "arith-demo.yaml"
#: the demonstration's cold start (scripts/rl-demo.sh): the loss plateaus near 0.6 until the model
#: learns to copy the tool's output (~step 450); ~4 minutes on 2 quiet cores
SFT_ARGS = [
    "--lr",
    "1e-3",
    "--max-steps",
    "1200",
    "--batch-size",
    "16",
    "--lr-scheduler",
    "cosine",
    "--warmup",
    "20",
    "--seed",
    "0",
]
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}


def _run(args: list[str], timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cold_start() -> tuple[object, Path]:
    """The arithmetic task and its cold-start SFT checkpoint (built once, reused while its inputs hold)."""
    task = build_task(CACHE / "arith", seed=0)
    sft = CACHE / "sft"
    marker = CACHE / "sft.args.json"
    want = json.dumps(
        {
            "args": SFT_ARGS,
            "task": (task.root / ".thor-arith.json").read_text()
            if (task.root / ".thor-arith.json").exists()
            else str(task.root),
        }
    )
    if not (sft / "final" / "config.json").is_file() or not marker.is_file() or marker.read_text() != want:
        r = _run(
            [
                sys.executable,
                "-m",
                "trainer.sft",
                "--data",
                str(task.coldstart_samples),
                "--model",
                str(task.base_model),
                "--out",
                str(sft),
                "--overwrite",
                "--no-progress",
                *SFT_ARGS,
            ],
            timeout=1800,
        )
        assert r.returncode == 0, r.stderr[-4000:]
        marker.write_text(want)
    return task, sft / "final"


def _rl(task, model: Path, out: Path, *extra: str, steps: int = 2) -> subprocess.CompletedProcess:
    return _run(
        [
            sys.executable,
            "-m",
            "trainer.rl",
            "--config",
            str(DEMO),
            "--model",
            str(model),
            "--problems",
            str(task.train_problems),
            "--out",
            str(out),
            "--steps",
            str(steps),
            "--no-progress",
            "--group-size",
            "4",
            "--groups-per-step",
            "2",
            "--set",
            "step.max_groups_per_step=1",
            "--set",
            "schedule.checkpoint_every=1",
            "--set",
            f"eval.benchmarks={task.heldout_problems}",
            "--set",
            "eval.limit=8",
            "--set",
            "eval.every=0",
            "--set",
            "engine.max_num_seqs=16",
            *extra,
        ]
    )


@pytest.mark.long  # an RL training run end to end: `make test-long`
def test_rl_runs_checkpoints_resumes_and_the_server_serves_it(cold_start, tmp_path):
    task, sft = cold_start
    out = tmp_path / "run"
    r = _rl(task, sft, out)
    assert r.returncode == 0, r.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["trajectory"]["rollouts"] >= 8 and row["trajectory"]["groups"] >= 2
        if row["records"]:  # an update happened and was synced: vLLM runs exactly the trained weights
            assert row["probe_max_abs"] <= 0.01
            assert row["learner"]["tokens"] > 0 and row["learner"]["grad_norm"] >= 0
    assert any(row["records"] for row in rows), "no group was kept in 2 steps: the cold start has no variance"
    # checkpoints: servable, untied, record what they were trained on; the weights moved
    final = (out / "final").resolve()
    assert final.name == "step-2" and (final / "state").is_dir()
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    trained = json.loads((final / "thor_training.json").read_text())
    assert any(k.startswith("train/") for k in trained["problems"])
    before, after = load_file(str(sft / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert any(not (before[k].float() == after[k].float()).all() for k in before)
    # the held-out evaluation ran before and after, through trainer.evaluate's records and summary
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert (out / "eval" / "step-2" / "summary.json").is_file()
    assert (out / "metrics.png").stat().st_size > 10_000
    with gzip.open(out / "rollouts" / "step-1.jsonl.gz", "rt") as f:
        logged = [json.loads(line) for line in f]
    assert {"trajectory"} <= {x["level"] for x in logged} and all("text" in x for x in logged)

    # resume: one more step from the last checkpoint, nothing redone; the problem stream and the learner
    # (optimizer steps, with its weights and Adam state) go on where step 2 left them
    loop2 = json.loads((final / "loop.json").read_text())
    assert loop2 == {"step": 2, "cursor": rows[1]["problem_cursor"]}
    r = _rl(task, sft, out, "--resume", steps=3)
    assert r.returncode == 0, r.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert (out / "final").resolve().name == "step-3"
    drawn = rows[2]["trajectory"]["groups"]  # problems step 3 drew
    assert rows[2]["problem_cursor"] == loop2["cursor"] + drawn
    assert json.loads(((out / "final") / "loop.json").read_text())["cursor"] == rows[2]["problem_cursor"]
    step3_updates = int(rows[2]["learner"].get("updates", 0))
    assert rows[2]["optimizer_steps"] == rows[1]["optimizer_steps"] + step3_updates
    assert rows[1]["optimizer_steps"] >= 1
    assert "resuming from" in r.stderr and f"problem cursor {loop2['cursor']}" in r.stderr
    # a changed configuration is refused on resume, with the reason
    r = _rl(task, sft, out, "--resume", "--lr", "0.5", steps=4)
    assert r.returncode == 1 and "configuration differs" in r.stderr

    # the server serves the checkpoint unchanged, and the model uses its tool there
    from openai import OpenAI

    with run_server(tiny_server_args(out / "final", "thor-arith-rl", max_model_len=1024)) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none")
        problem = json.loads(task.heldout_problems.read_text().splitlines()[0])
        resp = client.chat.completions.create(
            model="thor-arith-rl",
            messages=[{"role": "user", "content": problem["problem"]}],
            max_tokens=200,
            temperature=0,
            extra_body={"thor": {"observation": {"profile": "reference"}, "self_correction": False}},
        )
    text = resp.choices[0].message.content or ""
    assert "\\boxed{" in text or "```python" in text, text


def test_rl_reports_bad_configuration(tmp_path):
    r = _run([sys.executable, "-m", "trainer.rl", "--config", str(DEMO), "--set", "trajectory.grup_size=4"])
    assert r.returncode == 2 and "trajectory.grup_size" in r.stderr and "Extra inputs" in r.stderr
    r = _run([sys.executable, "-m", "trainer.rl", "--config", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _run([sys.executable, "-m", "trainer.rl", "--config", str(DEMO), "--set", "optim.micro_batch_size=128"])
    assert r.returncode == 2 and "micro_batch_size" in r.stderr
    r = _run(
        [
            sys.executable,
            "-m",
            "trainer.rl",
            "--config",
            str(DEMO),
            "--problems",
            "gsm8k",
            "--out",
            str(tmp_path / "x"),
            "--model",
            str(tmp_path),
        ]
    )
    assert r.returncode == 1 and "held out for evaluation" in r.stderr


@pytest.mark.long  # an RL training run end to end: `make test-long`
def test_rl_runs_under_accelerate_ddp_with_two_cpu_processes(cold_start, tmp_path):
    """The whole loop under `accelerate launch` (2 CPU processes, gloo): the main process samples
    and syncs vLLM, both update on the broadcast batch, the checkpoint is written once."""
    import socket

    task, sft = cold_start
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = _run(
        [sys.executable, "-m", "accelerate.commands.launch",
         "--config_file", str(ROOT / "trainer/configs/accelerate/ddp_cpu.yaml"), "--main_process_port", str(port),
         "-m", "trainer.rl", "--config", str(DEMO), "--model", str(sft), "--problems", str(task.train_problems),
         "--out", str(out), "--steps", "2", "--no-progress", "--group-size", "4", "--groups-per-step", "2",
         "--set", "step.max_groups_per_step=1", "--set", "eval.benchmarks=", "--set", "engine.max_num_seqs=16"],
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-6000:]
    assert "[rl] process 0 of 2" in r.stderr and "[rl] process 1 of 2" in r.stderr  # both took part
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row.get("probe_max_abs", 0.0) <= 0.01 for row in rows)
    assert (out / "final" / "model.safetensors").is_file()
    # an update happened, on both processes' share, and vLLM took it
    updated = [row for row in rows if row["records"]]
    assert updated, "no group was kept in 2 steps: nothing was trained"
    for row in updated:
        assert row["learner"]["updates"] >= 1 and row["learner"]["tokens"] > 0 and row["learner"]["grad_norm"] > 0
        assert row["probe_change"] >= row["probe_change_gap"] * 2
    assert rows[-1]["optimizer_steps"] == sum(int(row["learner"].get("updates", 0)) for row in rows)
    before = load_file(str(sft / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert any(not (before[k].float() == after[k].float()).all() for k in before)
