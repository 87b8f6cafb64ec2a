"""The RL run's checks that need no engine (trainer/rl/runner.py, config.py), through `python -m trainer.rl`'s
`main` in process: what it refuses before anything expensive starts, and how it keeps its run directory.

Does not own: a run with rollouts (tests/test_rl.py, slow), the learner (tests/test_rl_learner.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.rl.__main__ import EXIT_RUN, main
from trainer.splits import TRAINING_PROBLEMS_FILE, TrainingProblems

DEMO = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "rl" / "arith-demo.yaml"


def write_problems(path: Path, ids: list[str]) -> Path:
    rows = [{"id": i, "problem": f"What is {n} + 1?", "answer": str(n + 1)} for n, i in enumerate(ids)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rl_main(model: Path, problems: Path, out: Path, *extra: str) -> int:
    return main(
        ["--config", str(DEMO), "--model", str(model), "--problems", str(problems), "--out", str(out),
         "--no-progress", *extra]
    )  # fmt: skip


def test_held_out_evaluation_refuses_training_problems(tmp_path, capsys) -> None:
    """RL's own evaluation runs the evaluate command's overlap check (same SplitError text), before any
    model loads: on this run's training problems and on those the starting checkpoint was trained on."""
    train = write_problems(tmp_path / "drills.jsonl", ["a", "b", "c"])
    heldout = write_problems(tmp_path / "exam.jsonl", ["x", "y"])
    model = tmp_path / "model"  # no weights: the check comes first
    model.mkdir()

    code = rl_main(model, train, tmp_path / "run1", "--set", f"eval.benchmarks={train}")
    err = capsys.readouterr().err
    assert code == EXIT_RUN
    assert "3 of the evaluation problems were in the RL run" in err and "drills/a" in err
    assert "eval.allow_train_overlap" in err  # the way out is a setting of this command

    # the starting checkpoint (an SFT output) was trained on exam/x
    (model / TRAINING_PROBLEMS_FILE).write_text(TrainingProblems(problems=["exam/x"]).model_dump_json())
    code = rl_main(model, train, tmp_path / "run2", "--set", f"eval.benchmarks={heldout}")
    err = capsys.readouterr().err
    assert code == EXIT_RUN and "1 of the evaluation problems were in" in err and "exam/x" in err

    # told to score them anyway: the check lets the run go on (here to the missing weights)
    code = rl_main(model, train, tmp_path / "run3", "--set", f"eval.benchmarks={heldout}",
                   "--set", "eval.allow_train_overlap=true")  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_RUN and "no config.json there" in err and "evaluation problems were in" not in err


def test_resume_without_a_checkpoint_redoes_every_step_once(tmp_path, capsys) -> None:
    """A run that stopped before its first checkpoint restarts from step 0 on --resume: the lines of the
    steps (and of the evaluation before training) it logged are dropped, not kept next to their redo."""
    train = write_problems(tmp_path / "drills.jsonl", ["a", "b"])
    model = tmp_path / "model"  # no weights: every start stops at the learner, after the run dir is set up
    model.mkdir()
    out = tmp_path / "run"
    assert rl_main(model, train, out, "--set", "eval.benchmarks=") == EXIT_RUN
    # what the stopped run had logged: the evaluation before training and two steps, no checkpoint
    (out / "eval.jsonl").write_text(json.dumps({"step": 0, "x/thor-rl": {"accuracy": 0.5}}) + "\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2)))
    assert rl_main(model, train, out, "--set", "eval.benchmarks=", "--resume") == EXIT_RUN
    assert "no config.json there" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "" and (out / "eval.jsonl").read_text() == ""


def test_engine_options_share_the_gpu_and_match_the_learners_logprobs(tmp_path) -> None:
    """vLLM's GPU memory share is a setting (the learner sits on the same GPU), and its sampled log-probs
    are those of the distribution it samples from (after temperature), which the learner computes."""
    from trainer.rl.config import load_config
    from trainer.rl.runner import engine_options

    cfg = load_config(DEMO, {"engine.gpu_memory_utilization": 0.35})
    opts = engine_options(cfg, tmp_path)
    assert opts.gpu_memory_utilization == 0.35 and opts.model == str(tmp_path)
    assert opts.extra["logprobs_mode"] == "processed_logprobs"
    assert engine_options(load_config(DEMO), tmp_path).gpu_memory_utilization == 0.5  # not vLLM's 0.9
