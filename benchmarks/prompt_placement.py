"""Prompt study: THOR's tool instructions as a system message (the product default) vs in the user turn.

    .venv/bin/python benchmarks/prompt_placement.py gsm8k 40 default

Runs the `thor` mode of trainer.evaluate in process on the first N problems of a benchmark,
greedy, `--max-tokens 1024`, twice: (system) the messages the server builds (THOR's
instructions appended as a system message); (user) no system message, the instructions
appended to the user turn after the problem. Prints, per placement: problems, correct,
trajectories with code, calls, calls that ran ok, and correct answers among trajectories
with code; saves them to benchmarks/results/prompt_placement.json.

Measured 2026-11-30 (default model, GSM8K 1-40; another evaluation shared the machine, which
changes timings only): system: 6/40 correct, 7 with code (7 calls, 7 ok, 0 of those right);
user: 4/40 correct, 17 with code (17 calls, 17 ok, 1 right). The instructions in the user
turn make the small model write code more than twice as often, and its code runs, but
the programs compute the wrong quantity: accuracy does not improve, so the default stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from thor_engine.answer import answers_match
from thor_engine.config import SamplingOptions
from thor_engine.prompting import TIR_INSTRUCTIONS
from trainer.evaluate.benchmarks import load_benchmark, select
from trainer.evaluate.modes import MODES
from trainer.evaluate.targets import InProcessTarget


async def main(bench: str, n: int, model: str) -> dict[str, dict[str, int]]:
    probs = select(load_benchmark(bench), limit=n)
    thor = MODES["thor"]
    in_user = dataclasses.replace(thor, tir_instructions=None)  # tools on, nothing added as a system message
    async with InProcessTarget.open(model) as t:
        slots = asyncio.Semaphore(8)

        async def one(placement: str, p):  # type: ignore[no-untyped-def]
            async with slots:
                if placement == "system":
                    msgs, mode = thor.messages(p.problem), thor
                else:
                    msgs, mode = [{"role": "user", "content": p.problem + "\n\n" + TIR_INSTRUCTIONS}], in_user
                return placement, p, await t.generate(mode, msgs, SamplingOptions(max_tokens=1024))

        res = await asyncio.gather(*[one(pl, p) for pl in ("system", "user") for p in probs])
    out: dict[str, dict[str, int]] = {}
    for placement, p, g in res:
        ok = bool(g.answer) and answers_match(g.answer or "", p.answer)
        d = out.setdefault(
            placement, dict.fromkeys(("n", "correct", "with_code", "calls", "calls_ok", "coded_right"), 0)
        )
        d["n"] += 1
        d["correct"] += ok
        d["with_code"] += g.tools.calls > 0
        d["calls"] += g.tools.calls
        d["calls_ok"] += g.tools.ok
        d["coded_right"] += ok and g.tools.calls > 0
    return out


if __name__ == "__main__":
    bench, n, model = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "default"
    result = asyncio.run(main(bench, n, model))
    for placement, d in result.items():
        print(bench, model, placement, d)
    path = Path(__file__).parent / "results" / "prompt_placement.json"
    path.write_text(json.dumps({"benchmark": bench, "problems": n, "model": model, "result": result}, indent=2) + "\n")
