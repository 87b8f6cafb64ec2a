"""`python -m trainer.tirgen` end to end: a live THOR server on a tiny model as actor and critic, the real sandbox.

The tiny model (tests/support/tiny_tir_model.py, with extra memorised turns) knows the
exact actor and critic turns of two problems, rendered by TIRGen's own prompt code, so
greedy decoding walks TIRGen's loop for real: the actor's reasoning, the critic's code
executed in the sandbox with its output injected, the actor's ending after the
rewritten prefix. One problem's critic code fails (the sample is dropped, counted);
the other is kept, and asked for twice (dedup keeps one) and under a wrong gold
answer (the correctness filter rejects it). The filters' own cases are in
tests/test_tirgen_filters.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.thor_server import ROOT, run_server, tiny_server_args
from thor_engine.observation import injection
from trainer.tirgen.endpoints import critic_lead
from trainer.tirgen.prompts import actor_messages, critic_messages

pytestmark = [pytest.mark.timeout(900), pytest.mark.vllm, pytest.mark.sandbox, pytest.mark.slow]

GOOD = "A baker makes 12 trays of 7 muffins and sells 59. How many muffins are left?"
GOOD_ACTOR = (
    "The baker makes 12 * 7 = 84 muffins.\nAfter selling, 84 - 59 = 35 are left.\nSo the answer is \\boxed{35}."
)
GOOD_CODE = "print(12 * 7 - 59)\n```"
#: The critic's text after the real output, and the actor's ending: each goes on with an output block it invents
#: (as the default model did in the shipped run); both completions stop at that fence, so it is never kept.
GOOD_AFTER = "So 25 muffins are left.\n"
GOOD_ENDING = "The answer is \\boxed{25}.\n"
INVENTED = "```output\n25\n```\nSo 25 it is."

BAD = "Divide 3 apples among 0 children. How many does each get?"
BAD_ACTOR = "Each child gets 3 / 0 apples.\nThat is 3 / 0 = 0.\nSo \\boxed{0}."
BAD_CODE = "print(3 / 0)\n```"


def _turns(tok) -> list[tuple[str, str]]:
    """The (prompt text, completion) pairs TIRGen's loop will ask for, built with its own prompt code."""

    def chat(messages: list[dict[str, str]]) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    pairs = []
    for problem, actor_text, code in ((GOOD, GOOD_ACTOR, GOOD_CODE), (BAD, BAD_ACTOR, BAD_CODE)):
        actor_prompt = chat(actor_messages(problem))
        pairs.append((actor_prompt, actor_text))
        fragment = actor_text[: actor_text.index("\\boxed")]
        fragment = fragment[: fragment.rfind("\n") + 1]
        lead = critic_lead(problem, "", fragment)
        critic = chat(critic_messages(problem, "", fragment)) + lead + "```python\n"
        pairs.append((critic, code))
        if problem == GOOD:
            shown = critic + code + "\n" + injection("25", True)
            pairs.append((shown, GOOD_AFTER + INVENTED))
            rewritten = lead + "```python\n" + code + "\n" + injection("25", True) + GOOD_AFTER
            pairs.append((actor_prompt + rewritten, GOOD_ENDING + INVENTED))
    return pairs


@pytest.fixture(scope="module")
def tirgen_model(default_model: Path) -> Path:
    from transformers import AutoTokenizer

    from tests.support.tiny_tir_model import build_tiny_tir_model

    tok = AutoTokenizer.from_pretrained(default_model)
    return build_tiny_tir_model(ROOT / ".cache" / "models" / "tiny-tirgen", default_model, extra=_turns(tok))


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tirgen") / "problems.jsonl"
    rows = [
        {"id": "good", "problem": GOOD, "answer": "25"},
        {"id": "bad", "problem": BAD, "answer": "0"},
        {"id": "wrong-gold", "problem": GOOD, "answer": "35"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tirgen(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer.tirgen", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def server(tirgen_model: Path, sandbox):
    with run_server(tiny_server_args(tirgen_model, "tiny-tirgen", sandbox_url=sandbox.url)) as s:
        yield s


@pytest.fixture(scope="module")
def run(server, sandbox, tirgen_model: Path, problems_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tirgen-run") / "run"
    common = [
        "--actor-url", server.url, "--actor-tokenizer", str(tirgen_model), "--problems", str(problems_file),
        "--sandbox-url", sandbox.url, "--actor-temperature", "0", "--min-fragment-tokens", "1",
        "--samples-per-problem", "2", "--disable-filter", "code_quality", "--disable-filter", "single_call_downsample",
        "--out", str(out),
    ]  # fmt: skip
    r = tirgen(*common)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.long  # TIRGen end to end on its memorising model: `make test-long`
def test_kept_sample_has_the_real_tool_output_and_the_rewritten_ending(run: Path) -> None:
    from trainer.tirgen.sample import read_samples

    kept = list(read_samples(run / "samples.jsonl"))
    assert [s.id for s in kept] == ["problems/good"], [s.id for s in kept]
    s = kept[0]
    kinds = [seg.kind for seg in s.segments]
    assert kinds == ["prompt", "model", "observation", "model"], kinds
    # the real output (25) replaced the actor's wrong arithmetic (35); the actor's ending follows it
    assert s.segments[2].text == "```output\n25\n```\n"
    # the actor's first line states a computed value (12 * 7 = 84): the critic's turn does not carry it over
    assert s.segments[1].text == "```python\nprint(12 * 7 - 59)\n```\n"
    # the critic's and the actor's invented output blocks were never written: both stopped at the fence
    assert s.segments[3].text == GOOD_AFTER + GOOD_ENDING
    assert "```output" not in s.model_text
    assert s.answer == "25" and s.correct and s.code_calls == 1
    # the training prompt is what the server renders: THOR's tool instructions in the system message
    assert "```python code block" in s.segments[0].text and s.segments[0].text.endswith("<|im_start|>assistant\n")
    assert s.actor_model == s.critic_model == "tiny-tirgen"


def test_the_critic_is_prefilled_only_with_a_first_line_that_states_no_computed_value() -> None:
    problem = "A baker makes 12 trays of 7 muffins and sells 59 muffins. How many muffins are left?"
    then = "\nAfter selling 59, 84 - 59 = 25 are left.\n"
    assert critic_lead(problem, "", "The baker makes 12 trays of 7 muffins." + then) == (
        "The baker makes 12 trays of 7 muffins.\n"
    )
    assert critic_lead(problem, "", "First we find the total number of muffins." + then) != ""
    # a computed result, with or without its arithmetic, stays with the actor
    assert critic_lead(problem, "", "The baker makes 12 * 7 = 84 muffins." + then) == ""
    assert critic_lead(problem, "", "The baker makes $12 \\times 7 = 84$ muffins." + then) == ""
    assert critic_lead(problem, "", "The baker makes 84 muffins in total." + then) == ""
    # ... unless the number came from a real output earlier in the solution
    so_far = "```python\nprint(12 * 7)\n```\n```output\n84\n```\n"
    assert critic_lead(problem, so_far, "Of the 84 muffins, 59 are sold." + then) == "Of the 84 muffins, 59 are sold.\n"
    assert critic_lead(problem, "", "A one-line step: 12 trays of 7 muffins.") == ""


def test_the_critic_judges_tool_outputs_by_the_rules_rl_rolls_out_with() -> None:
    """One setting (thor_engine.config.TRAINING_OBSERVATION_PROFILE) for TIRGen's data and RL's rollouts: a block
    that prints nothing is a failed call in both, never a notebook echo in the data that RL then counts as failed."""
    from thor_engine.config import rl_rollout_config, rl_step_config
    from trainer.tirgen.endpoints import CompletionsClient, Critic

    critic = Critic(CompletionsClient(None, "critic", None), None, max_calls=4)
    assert critic.observation == rl_rollout_config().observation == rl_step_config().observation
    assert critic.observation.profile == "reference" and critic.observation.require_stdout


@pytest.mark.long  # TIRGen end to end on its memorising model: `make test-long`
def test_funnel_counts_the_critic_failure_the_wrong_answer_and_the_duplicate(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attempted"] == 6  # 3 problems x 2 samples
    assert summary["dropped_before_filters"] == {"critic_code_failed": 2}
    stages = {s["stage"]: s for s in summary["funnel"]}
    assert stages["critic_code_failed"]["in"] - stages["critic_code_failed"]["out"] == 2
    assert stages["correct"]["in"] - stages["correct"]["out"] == 2  # the wrong-gold problem, twice
    assert stages["dedup"]["in"] - stages["dedup"]["out"] == 1  # the good problem's second sample
    assert summary["kept"] == 1
    assert summary["code_invocation_ratio"] == {"generated": 1.0, "kept": 1.0}
    rejected = [json.loads(line) for line in (run / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["stage"] for r in rejected) == ["correct", "correct", "dedup"]
    drops = [json.loads(line) for line in (run / "generated.jsonl").read_text().splitlines()]
    failed = [d for d in drops if d["status"] == "dropped"]
    assert {d["id"] for d in failed} == {"problems/bad"}
    assert all("ZeroDivisionError" in d["detail"] for d in failed)
    assert (run / "funnel.png").stat().st_size > 1000 and "| critic_code_failed | 6 | 4 | 2 |" in (
        run / "funnel.md"
    ).read_text()


@pytest.mark.long  # TIRGen end to end on its memorising model: `make test-long`
def test_resume_redoes_nothing_and_samples_load_with_datasets(run: Path, server, sandbox, tirgen_model, problems_file):
    import datasets

    before = (run / "generated.jsonl").read_text()
    r = tirgen(
        "--actor-url", server.url, "--actor-tokenizer", str(tirgen_model), "--problems", str(problems_file),
        "--sandbox-url", sandbox.url, "--actor-temperature", "0", "--min-fragment-tokens", "1",
        "--samples-per-problem", "2", "--disable-filter", "code_quality", "--disable-filter", "single_call_downsample",
        "--out", str(run), "--resume",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "generated.jsonl").read_text() == before
    ds = datasets.load_dataset("json", data_files=str(run / "samples.jsonl"), split="train")
    assert ds.num_rows == 1 and ds[0]["segments"][2]["kind"] == "observation"


@pytest.mark.long  # TIRGen end to end on its memorising model: `make test-long`
def test_rerun_without_resume_and_changed_settings_are_refused(run: Path, server, tirgen_model, problems_file):
    base = ["--actor-url", server.url, "--actor-tokenizer", str(tirgen_model), "--problems", str(problems_file)]
    r = tirgen(*base, "--out", str(run))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = tirgen(*base, "--out", str(run), "--resume", "--step-tokens", "64")
    assert r.returncode == 2 and "different settings" in r.stderr and "config" in r.stderr


@pytest.mark.long  # TIRGen end to end on its memorising model: `make test-long`
def test_unreachable_endpoint_and_unknown_model_are_clear_errors(server, problems_file, tmp_path: Path) -> None:
    r = tirgen("--actor-url", "http://127.0.0.1:9", "--problems", str(problems_file), "--out", str(tmp_path / "a"))
    assert r.returncode == 1 and "unreachable" in r.stderr, r.stderr
    r = tirgen(
        "--actor-url", server.url, "--actor-model", "no-such-model", "--problems", str(problems_file),
        "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert r.returncode == 1 and "does not serve model 'no-such-model'" in r.stderr and "tiny-tirgen" in r.stderr


def test_eval_problems_are_refused_unless_allowed(tmp_path: Path) -> None:
    r = tirgen("--actor-url", "http://127.0.0.1:9", "--benchmark", "math500", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "held out for evaluation" in r.stderr and "--allow-eval-problems" in r.stderr


def test_splits_keep_gsm8k_training_rows_apart_from_its_held_out_rows() -> None:
    from trainer.evaluate.benchmarks import load_benchmark
    from trainer.splits import split_problems

    gsm8k = load_benchmark("gsm8k")
    train, held_out = split_problems(gsm8k, "train"), split_problems(gsm8k, "eval")
    assert len(held_out) == 200 and [p.index for p in held_out] == list(range(200))
    assert len(train) == len(gsm8k) - 200 and not {p.id for p in train} & {p.id for p in held_out}
    assert split_problems(load_benchmark("math500"), "train") == []


def test_evaluate_refuses_a_checkpoint_on_its_training_problems(tmp_path: Path) -> None:
    from trainer.splits import TRAINING_PROBLEMS_FILE, TrainingProblems

    model = tmp_path / "sft-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    trained = TrainingProblems(problems=["gsm8k/gsm8k-250", "gsm8k/gsm8k-251"], sources=["x/samples.jsonl"])
    (model / TRAINING_PROBLEMS_FILE).write_text(trained.model_dump_json())
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "trainer.evaluate", "--model", str(model), "--benchmarks", "gsm8k"]
    r = subprocess.run(
        [*cmd, "--offset", "249", "--limit", "3", "--out", str(tmp_path / "e")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "2 of the evaluation problems were in" in r.stderr and "gsm8k/gsm8k-250" in r.stderr
    assert "--allow-train-overlap" in r.stderr
    assert not (tmp_path / "e").exists()  # refused before any model is loaded or run directory made
