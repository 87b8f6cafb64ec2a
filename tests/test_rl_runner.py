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
