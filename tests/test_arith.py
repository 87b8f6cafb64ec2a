"""Tests of the synthetic arithmetic task (trainer/arith): problems, tokenizer, base model, cold start.

Fast: one small build per module (a few seconds), no vLLM. The slow test runs a short
`python -m trainer.sft` on the built task in a subprocess and checks that the loss falls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from thor_engine.config import ObservationConfig
from thor_engine.observation import injection, judge
from thor_engine.prompting import render_chat
from trainer.arith import ArithTask, build_task
from trainer.arith.build import MARKER
from trainer.arith.coldstart import GUESS_SPREAD, MIX, OPENING, Mix, rounded_estimate
from trainer.arith.task import evaluate_expression, make_problems, read_problems
from trainer.sft.encode import encode_segments, end_token_id
from trainer.tirgen.prompts import training_messages
from trainer.tirgen.sample import read_samples

REPO = Path(__file__).resolve().parents[1]
TRAIN, HELDOUT = 600, 60


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> ArithTask:
    return build_task(tmp_path_factory.mktemp("arith") / "task", seed=0, train_size=TRAIN, heldout_size=HELDOUT)


@pytest.fixture(scope="module")
def tokenizer(task: ArithTask):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(task.base_model))


def _files(task: ArithTask) -> dict[str, bytes]:
    return {
        name: path.read_bytes()
        for name, path in (
            ("train", task.train_problems),
            ("heldout", task.heldout_problems),
            ("samples", task.coldstart_samples),
            ("tokenizer", task.base_model / "tokenizer.json"),
            ("weights", task.base_model / "model.safetensors"),
        )
    }


def test_two_builds_give_the_same_bytes(task: ArithTask, tmp_path: Path) -> None:
    again = build_task(tmp_path / "again", seed=0, train_size=TRAIN, heldout_size=HELDOUT)
    assert _files(again) == _files(task)
    other = build_task(tmp_path / "other", seed=1, train_size=TRAIN, heldout_size=HELDOUT)
    assert _files(other)["train"] != _files(task)["train"]


def test_build_is_reused_when_complete_and_redone_when_incomplete(tmp_path: Path) -> None:
    out = tmp_path / "t"
    build_task(out, train_size=50, heldout_size=10)
    stamp = (out / MARKER).stat().st_mtime_ns
    build_task(out, train_size=50, heldout_size=10)
    assert (out / MARKER).stat().st_mtime_ns == stamp  # reused, not rebuilt
    (out / MARKER).unlink()
    (out / "coldstart" / "samples.jsonl").unlink()
    task = build_task(out, train_size=50, heldout_size=10)
    assert task.coldstart_samples.is_file() and (out / MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "t"]  # no temporary directory left behind
    bigger = build_task(out, train_size=60, heldout_size=10)  # other settings: rebuilt in place
    assert len(read_problems(bigger.train_problems)) == 60


def test_splits_are_disjoint_and_answers_exact(task: ArithTask) -> None:
    train, heldout = read_problems(task.train_problems), read_problems(task.heldout_problems)
    assert (len(train), len(heldout)) == (TRAIN, HELDOUT)
    expr = [r["problem"].removeprefix("What is ").removeprefix("Compute ")[:-1] for r in train + heldout]
    assert len(set(expr)) == len(expr)  # no expression twice, so none in both splits
    for row, e in zip(train + heldout, expr, strict=True):
        assert set(row) == {"id", "problem", "answer"}
        a, _, b, op, c = e.split()
        assert row["answer"] == str(int(a) * int(b) + (int(c) if op == "+" else -int(c)))
        assert row["answer"] == str(eval(e, {"__builtins__": {}}))  # the tool's own arithmetic
        assert 12 <= int(a) <= 99 and 12 <= int(b) <= 99
    assert len({r["id"] for r in train + heldout}) == TRAIN + HELDOUT


def test_expression_parser_rejects_other_forms() -> None:
    assert evaluate_expression("12 * 13 - 5") == 151
    for bad in ("12 * 13", "12 + 13 * 5", "__import__('os') * 1 + 1"):
        with pytest.raises(ValueError, match="not of the form"):
            evaluate_expression(bad)
    with pytest.raises(ValueError, match="must both be >= 1"):
        make_problems(0, 10, 0)


def test_tokenizer_round_trips_all_task_text_with_single_digit_tokens(task: ArithTask, tokenizer) -> None:
    assert 400 <= len(tokenizer) <= 1000
    texts = [s.text for sample in read_samples(task.coldstart_samples) for s in sample.segments]
    texts += ["What is 37 * 48 + 12?\n```python\nprint(37 * 48 + 12)\n```\n", "  \n\n`` ``` \t x\\boxed{-5}"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    digits = tokenizer.encode("1234567890", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in digits] == list("1234567890")
    for text in ("The answer is \\boxed{3914}.", "print(65 * 60 + 14)"):
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
        assert all(not any(ch.isdigit() for ch in p) or len(p) == 1 for p in pieces), pieces
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in tokenizer.all_special_ids
    assert end_token_id(tokenizer) == tokenizer.eos_token_id


def test_prompt_segment_is_what_the_server_renders(task: ArithTask, tokenizer) -> None:
    samples = list(read_samples(task.coldstart_samples))
    assert len(samples) == TRAIN
    for sample in samples[:50]:
        prompt = sample.segments[0]
        assert prompt.kind == "prompt"
        assert sample.messages == training_messages(sample.problem, cot_instruction=False)
        ids = render_chat(tokenizer, sample.messages)
        assert tokenizer.encode(prompt.text, add_special_tokens=False) == ids
        assert prompt.text.startswith("<|im_start|>system\nYou are a careful mathematician")
        assert prompt.text.endswith(f"<|im_start|>user\n{sample.problem}<|im_end|>\n<|im_start|>assistant\n")


def test_observations_are_the_decoders_injections_and_branches_are_as_designed(task: ArithTask) -> None:
    cfg = ObservationConfig(profile="reference")
    assert cfg.require_stdout
    for sample in read_samples(task.coldstart_samples):
        branch, expr, gold = sample.meta["branch"], sample.meta["expression"], sample.gold
        kinds = [s.kind for s in sample.segments]
        texts = [s.text for s in sample.segments]
        if branch == "direct":
            assert kinds == ["prompt", "model"]
            assert texts[1].startswith("I estimate it directly: \\boxed{")
            assert sample.answer != gold and sample.code_calls == 0
            continue
        assert kinds == ["prompt", "model", "observation", "model"]
        assert texts[1].startswith(OPENING)
        code = texts[1][len(OPENING) :].removesuffix("\n```\n")
        if branch == "print":
            assert code == f"print({expr})"
            expected = judge(0, f"{gold}\n", "", cfg)
            assert expected.ok and expected.text == gold
            assert texts[3] == f"The answer is \\boxed{{{gold}}}."
            assert sample.correct and sample.failed_calls == 0
        else:
            assert code == expr
            expected = judge(0, "", "", cfg)
            assert not expected.ok and expected.text == cfg.empty_message
            assert texts[3].startswith("The code printed nothing, so I estimate: \\boxed{")
            assert sample.answer != gold and 0 < abs(int(sample.answer) - int(gold)) <= GUESS_SPREAD
            assert sample.failed_calls == 1 and not sample.correct
        assert texts[2] == injection(expected.text, texts[1].endswith("\n"))
        assert texts[2] == f"```output\n{expected.text}\n```\n"


def test_rounded_guesses_are_the_rounded_product_and_never_right(tmp_path: Path) -> None:
    assert rounded_estimate("37 * 48 + 12") == 2000
    assert rounded_estimate("95 * 12 - 3") == 1000
    assert rounded_estimate("20 * 30 + 0") == 610  # would be exact: moved off the answer
    task = build_task(tmp_path / "r", train_size=300, heldout_size=10, mix=Mix(guess="rounded"))
    guessed = [s for s in read_samples(task.coldstart_samples) if s.meta["branch"] != "print"]
    assert guessed
    for sample in guessed:
        assert sample.answer == str(rounded_estimate(sample.meta["expression"])) != sample.gold
        assert sample.segments[-1].text.endswith(f"\\boxed{{{sample.answer}}}.")
    default = build_task(tmp_path / "n", train_size=300, heldout_size=10)
    assert default.coldstart_samples.read_bytes() != task.coldstart_samples.read_bytes()


def test_mix_proportions_follow_the_style(task: ArithTask) -> None:
    counts = Counter((s.meta["style"], s.meta["branch"]) for s in read_samples(task.coldstart_samples))
    total = sum(counts.values())
    branch = Counter()
    for (_, b), n in counts.items():
        branch[b] += n
    assert abs(branch["print"] / total - 0.45) < 0.06
    assert abs(branch["bare"] / total - 0.45) < 0.06
    assert abs(branch["direct"] / total - 0.10) < 0.04
    for style, lean in (("what", "print"), ("compute", "bare")):
        n = sum(v for (s, _), v in counts.items() if s == style)
        assert n > 0.4 * total
        assert abs(counts[(style, lean)] / n - MIX.lean) < 0.07
        assert abs(counts[(style, "direct")] / n - MIX.direct) < 0.05


def test_base_model_is_untied_loads_with_transformers_and_trains_on_the_samples(task: ArithTask, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(task.base_model))
    cfg = json.loads((task.base_model / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["vocab_size"] == len(tokenizer) and cfg["max_position_embeddings"] == 1024
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < params < 2e6
    gen = json.loads((task.base_model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    sample = next(read_samples(task.coldstart_samples))
    enc = encode_segments(tokenizer, sample.segments)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]))
    # random init: the loss is about log(vocab), the model knows nothing yet
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tokenizer)))).item()) < 1.0


def test_cli_builds_and_reports_bad_sizes(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.arith",
            "build",
            str(tmp_path / "t"),
            "--train-size",
            "20",
            "--heldout-size",
            "5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert f"base_model: {tmp_path / 't' / 'base'}" in run.stdout
    assert len(read_problems(tmp_path / "t" / "problems" / "heldout.jsonl")) == 5
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.arith", "build", str(tmp_path / "u"), "--heldout-size", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "error: " in bad.stderr and "heldout_size" in bad.stderr


@pytest.mark.slow
def test_short_sft_on_the_cold_start_lowers_the_loss(task: ArithTask, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.sft",
            "--data",
            str(task.coldstart_samples),
            "--model",
            str(task.base_model),
            "--out",
            str(out),
            "--lr",
            "2e-3",
            "--max-steps",
            "40",
            "--batch-size",
            "8",
            "--save-steps",
            "1000",
            "--logging-steps",
            "5",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "sft.json").read_text())
    assert summary["global_step"] == 40
    losses = [p["loss"] for p in json.loads((out / "train_log.json").read_text())["steps"]]
    assert losses[-1] < 0.6 * losses[0]
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["tie_word_embeddings"] is False
