"""A synthetic arithmetic tool-use task and its from-scratch tiny model: THOR's RL demonstration on 2 cores.

Owns nothing itself: task.py (problems, `build_task` / `ArithTask`), tokenizer.py (a
~500-token byte-level BPE with single-digit tokens), model.py (an untied ~1M-parameter
Qwen2), coldstart.py (the designed cold start), __main__.py (the CLI).

The task: ``What is 37 * 48 + 12?`` / ``Compute 37 * 48 - 12.`` (two-digit factors). The
cold start prints the expression (right: the tool's output is copied into ``\\boxed{}``),
writes it bare (a failed call under THOR's "no stdout is a failure" rule, then a wrong
guess) or guesses without code, in a mix tied to the phrasing, so both RL levels have
headroom (see coldstart.py). It exaggerates step-level RL's effect by construction: a
failed call here always means a wrong answer and the fix is one token.

Recipe and measured cold start (2 shared CPU cores; the SFT time depends on what else runs)::

    python -m trainer.arith build runs/arith                      # ~5 s; 4000 train / 200 held out
    python -m trainer.sft --data runs/arith/coldstart/samples.jsonl --model runs/arith/base \\
        --out runs/arith/sft --lr 1e-3 --max-steps 800 --batch-size 16 --warmup 20 --save-steps 10000
    python -m trainer.evaluate --model runs/arith/sft/final --benchmarks runs/arith/problems/heldout.jsonl \\
        --limit 100 --modes thor-rl --max-tokens 256 --max-model-len 1024 --dtype float32 --out runs/arith/eval-sft

Measured (seed 0, held-out 100, greedy, thor-rl through vLLM and the sandbox):
MEASURED_FIGURES

The copying of the tool output into ``\\boxed{}`` appears abruptly (the loss drops from
~0.55 to ~0.25) after about 400 steps at lr 1e-3; at lr 2e-3 with 600 steps it had not
appeared (accuracy 0.00, call success 0.49): check the cold start before RL.
"""

from .task import ArithTask, build_task

__all__ = ["ArithTask", "build_task"]
