"""Does the constrained answer keep THOR's accuracy? An analysis of a `thor-json` evaluation run.

    .venv/bin/python -m trainer.evaluate --model default --benchmarks gsm8k --limit 50 \
        --modes thor-json,json --k 1 --out RUN_DIR
    .venv/bin/python benchmarks/structured_answer_agreement.py RUN_DIR

Owns: reading a run's `thor-json` records twice over the same greedy trajectories: the answer the
model boxed in phase 1 (the text before the injected instruction: what `thor` mode returns for
that trajectory, since phase 1 is `thor` itself) and the JSON answer generated after it under the
constraint (what a client asking for `response_format` gets), scored with the harness's checker;
accuracies and the paired difference with the harness's bootstrap intervals, and the `json` mode
(THOR off) when the run has it. Prints a table and writes `structured_agreement.json` into RUN_DIR.

Does not own: generating anything (the run is `trainer.evaluate`'s), scoring rules
(thor_engine.answer), or the intervals' method (trainer/evaluate/metrics.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from thor_engine.answer import extract_boxed
from thor_engine.answer.verification import AnswerChecker
from thor_engine.final_answer import json_answer
from trainer.evaluate.metrics import bootstrap_interval, paired_bootstrap
from trainer.evaluate.modes import INTEGER_ANSWER

#: where phase 2 starts in a `thor-json` record's text: the instruction the targets inject (one source)
INSTRUCTION = json_answer(INTEGER_ANSWER, name="answer").instruction


def load(run_dir: Path) -> list[dict]:
    plain, packed = run_dir / "records.jsonl", run_dir / "records.jsonl.gz"
    if plain.exists():
        return [json.loads(line) for line in plain.read_text().splitlines() if line.strip()]
    if packed.exists():
        with gzip.open(packed, "rt") as f:
            return [json.loads(line) for line in f if line.strip()]
    raise SystemExit(f"error: {run_dir} holds no records.jsonl(.gz): pass a trainer.evaluate run directory")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    recs = [r for r in load(args.run_dir) if r.get("error") is None and r["sample"] == 0]
    structured = [r for r in recs if r["mode"] == "thor-json"]
    if not structured:
        print(
            f"error: {args.run_dir} has no thor-json records: run trainer.evaluate with --modes thor-json",
            file=sys.stderr,
        )
        return 2
    checker = AnswerChecker()
    boxed: dict[str, float] = {}
    answered: dict[str, float] = {}
    no_phase2 = 0
    for r in structured:
        key = f"{r['benchmark']}/{r['problem_id']}"
        head, found, _ = r["text"].partition(INSTRUCTION)
        no_phase2 += not found  # phase 1 ended by a budget: no answer phase (the JSON answer is missing)
        b = extract_boxed(head)
        boxed[key] = float(bool(b) and checker.answers_match(b, r["gold"]))
        answered[key] = float(r["correct"])
    off = {f"{r['benchmark']}/{r['problem_id']}": float(r["correct"]) for r in recs if r["mode"] == "json"}
    rows = {
        "thor-json, JSON answer (THOR on, constrained)": answered,
        "thor-json, phase-1 boxed answer (= thor)": boxed,
    }
    if off:
        rows["json (THOR off, constrained from the start)"] = off
    out: dict = {"run_dir": str(args.run_dir), "problems": len(answered), "without_answer_phase": no_phase2}
    print(f"{len(answered)} problems; {no_phase2} ended phase 1 by a budget (no answer phase)")
    for name, scores in rows.items():
        iv = bootstrap_interval(scores.values())
        out[name] = iv.model_dump()
        print(f"{name:48} {100 * iv.value:5.1f} ({100 * iv.low:.1f}-{100 * iv.high:.1f})")
    diffs = {"JSON answer - boxed answer": paired_bootstrap(answered, boxed)}
    if off:
        diffs["THOR on - THOR off (both JSON)"] = paired_bootstrap(answered, off)
    for name, d in diffs.items():
        out[name] = d.model_dump()
        print(f"{name:48} {100 * d.difference:+5.1f} ({100 * d.low:+.1f} to {100 * d.high:+.1f}), {d.paired} paired")
    out["agreement"] = {
        "both_right": sum(1 for k in answered if answered[k] and boxed[k]),
        "json_only": sum(1 for k in answered if answered[k] and not boxed[k]),
        "boxed_only": sum(1 for k in answered if boxed[k] and not answered[k]),
    }
    print("right in both: {both_right}, JSON only: {json_only}, boxed only: {boxed_only}".format(**out["agreement"]))
    (args.run_dir / "structured_agreement.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
