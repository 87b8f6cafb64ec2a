"""lm-evaluation-harness against the live server, end to end: the real server process with the
default model (Qwen2.5-Coder-0.5B-Instruct) on real vLLM (CPU), lm-eval 0.4.13's own CLI as
the client (`local-completions` and `local-chat-completions`, no hub access), and
`python -m trainer.evaluate --modes cot` on the same problems against the same server.

The arithmetic task (tests/fixtures/lm_eval/) sends cot mode's prompt (its system message,
greedy, the same max tokens) and scores a reply as the evaluator does (last \\boxed{}, then
thor_engine.answer's checker): lm-eval's per-problem correctness must equal the evaluator's,
over both endpoints. The multiple-choice task goes through `local-completions`' loglikelihood
requests (batched token-id prompts with echo, logprobs and max_tokens 1); its scores are
checked against the same model's log-probabilities computed with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from thor_engine.models.provision import PRESETS

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.sandbox]

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
SERVED = PRESETS["default"].name  # the served name of the shared `make serve`-like server
MAX_TOKENS = 192  # the tasks' max_gen_toks
PROBLEMS = [json.loads(line) for line in (TASKS / "arith.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(default_server):
    """The session's shared default-model server (tests/conftest.py)."""
    return default_server


def offline_env(tmp: Path) -> dict[str, str]:
    """No hub, a private datasets cache, no key (the test server is open on loopback)."""
    return {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "datasets"),
        "HF_HOME": str(tmp / "hf"),
        "OPENAI_API_KEY": "",
        "TOKENIZERS_PARALLELISM": "false",
    }


def lm_eval_command(tmp: Path, name: str, model: str, model_args: str, tasks: str, *extra: str) -> list[str]:
    """lm-eval's CLI as an operator runs it (cot mode's system prompt, the chat template, samples logged)."""
    from trainer.evaluate.modes import COT_PROMPT

    return [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(TASKS),
        "--apply_chat_template",
        "--system_instruction",
        COT_PROMPT,
        "--log_samples",
        "--output_path",
        str(tmp / name),
        *extra,
    ]


def run_all(tmp: Path, commands: dict[str, list[str]]) -> None:
    """Run the clients at the same time (the server batches their requests); each must succeed."""
    t0 = time.monotonic()
    procs = {}
    for name, cmd in commands.items():
        log = open(tmp / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=offline_env(tmp), stdout=log, stderr=log), log)
    try:
        for name, (proc, log) in procs.items():
            rc = proc.wait(timeout=max(1.0, 600 - (time.monotonic() - t0)))
            log.close()
            print(f"{name}: exit {rc} after {time.monotonic() - t0:.1f}s")
            assert rc == 0, (tmp / f"{name}.log").read_text()[-6000:]
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def lm_eval_output(tmp: Path, name: str, tasks: str) -> dict[str, Any]:
    """{"results": ..., "samples": {task: [...]}} of a finished lm-eval run."""
    out = tmp / name
    (results_file,) = out.rglob("results_*.json")
    samples = {
        task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in tasks.split(",")
    }
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


def by_problem(samples: list[dict[str, Any]]) -> dict[str, bool]:
    return {s["doc"]["id"]: bool(s["correct"]) for s in samples}


@pytest.mark.long  # lm-evaluation-harness and trainer.evaluate over two task sets: `make test-long`
def test_lm_eval_scores_agree_with_trainer_evaluate_cot(server, default_model, tmp_path):
    from transformers import AutoTokenizer

    from trainer.evaluate.modes import MODES

    base = f"model={SERVED},tokenizer_backend=huggingface,tokenizer={default_model},max_retries=1"
    run_all(
        tmp_path,
        {
            "completions": lm_eval_command(
                tmp_path,
                "completions",
                "local-completions",
                f"{base},base_url={server.url}/v1/completions",
                "thor_arith_cot,thor_mc",
                "--batch_size",
                "8",
            ),
            "chat": lm_eval_command(
                tmp_path,
                "chat",
                "local-chat-completions",
                f"model={SERVED},base_url={server.url}/v1/chat/completions,num_concurrent=8,max_retries=1",
                "thor_arith_cot_chat",
            ),
            "evaluate": [
                sys.executable,
                "-m",
                "trainer.evaluate",
                "--endpoint",
                server.url,
                "--endpoint-kind",
                "thor",
                "--model",
                SERVED,
                "--benchmarks",
                str(TASKS / "arith.jsonl"),
                "--problem-field",
                "problem",
                "--answer-field",
                "answer",
                "--id-field",
                "id",
                "--modes",
                "cot",
                "--max-tokens",
                str(MAX_TOKENS),
                "--concurrency",
                "8",
                "--no-progress",
                "--out",
                str(tmp_path / "evaluate"),
            ],
        },
    )
    completions = lm_eval_output(tmp_path, "completions", "thor_arith_cot,thor_mc")
    chat = lm_eval_output(tmp_path, "chat", "thor_arith_cot_chat")
    records = [json.loads(line) for line in (tmp_path / "evaluate" / "records.jsonl").read_text().splitlines()]
    reference = {r["problem_id"]: bool(r["correct"]) for r in records if r["mode"] == "cot"}

    # lm-eval sent cot mode's prompt: the chat template over cot's system and user messages
    tok = AutoTokenizer.from_pretrained(default_model)
    cot = MODES["cot"]
    for s in completions["samples"]["thor_arith_cot"]:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        expected = tok.apply_chat_template(
            cot.messages(s["doc"]["problem"]), tokenize=False, add_generation_prompt=True
        )
        assert context == expected, (context, expected)
        assert s["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == MAX_TOKENS
    for s in chat["samples"]["thor_arith_cot_chat"]:
        (rendered,) = s["arguments"]["gen_args_0"]["arg_0"]  # lm-eval logs the messages it sent as JSON
        messages = json.loads(rendered)
        assert messages == cot.messages(s["doc"]["problem"]), messages

    scores = {
        "trainer.evaluate": reference,
        "local-completions": by_problem(completions["samples"]["thor_arith_cot"]),
        "local-chat-completions": by_problem(chat["samples"]["thor_arith_cot_chat"]),
    }
    print(json.dumps({k: {p: int(v) for p, v in s.items()} for k, s in scores.items()}))
    ids = {p["id"] for p in PROBLEMS}
    assert all(set(s) == ids for s in scores.values()), {k: sorted(s) for k, s in scores.items()}
    assert scores["local-completions"] == reference
    assert scores["local-chat-completions"] == reference
    solved = sum(reference.values())
    assert 3 <= solved, f"only {solved} of {len(ids)} solved: agreement on (nearly) all-wrong proves little"
    assert completions["results"]["thor_arith_cot"]["correct,none"] == pytest.approx(solved / len(ids))
    assert chat["results"]["thor_arith_cot_chat"]["correct,none"] == pytest.approx(solved / len(ids))

    check_multiple_choice(completions, default_model, tok)


def check_multiple_choice(run: dict[str, Any], default_model: Path, tok: Any) -> None:
    """Each choice's loglikelihood, as lm-eval read it from the echoed prompt's logprobs, is the
    model's own: recomputed with transformers (float32 here, bfloat16 on the server)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    model.eval()
    samples = run["samples"]["thor_mc"]
    assert len(samples) == 5
    correct = 0
    for s in samples:
        ours = []
        for k, (resp, args) in enumerate(zip(s["resps"], s["arguments"].values(), strict=True)):
            context, continuation = args["arg_0"], args["arg_1"]
            # lm-eval's split (TemplateLM._encode_pair): trailing spaces join the continuation,
            # the whole text is tokenised and the context's tokens cut off its front
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = tok.encode(context, add_special_tokens=False)
            whole = tok.encode(context + continuation, add_special_tokens=False)
            cont = whole[len(ctx) :]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logits = model(ids).logits.log_softmax(-1)[0]
            want = sum(float(logits[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            got = float(resp[0][0])
            assert abs(got - want) <= 0.1 + 0.05 * abs(want), (s["doc"], k, got, want)
            ours.append(want)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == s["doc"]["label"])
        assert s["acc"] == float(max(range(len(ours)), key=lambda i: float(s["resps"][i][0][0])) == s["doc"]["label"])
    assert run["results"]["thor_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / len(samples))
    assert correct >= 3  # the model knows most of these; the server's scores rank choices as transformers does
