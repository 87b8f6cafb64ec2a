"""A synthetic arithmetic tool-use task and its from-scratch tiny model: THOR's RL demonstration on 2 cores.

Owns nothing itself: task.py (the problems), build.py (`build_task` / `ArithTask`: the
whole task directory), tokenizer.py (a ~500-token byte-level BPE with single-digit tokens),
model.py (an untied ~1M-parameter Qwen2), coldstart.py (the designed cold start),
__main__.py (the CLI).

The task: ``What is 37 * 48 + 12?`` / ``Compute 37 * 48 - 12.`` (two-digit factors). The
cold start prints the expression (right: the tool's output is copied into ``\\boxed{}``),
writes it bare (a failed call under THOR's "no stdout is a failure" rule, then a wrong
guess) or guesses without code, in a mix tied to the phrasing, so both RL levels have
headroom (see coldstart.py). It exaggerates step-level RL's effect by construction: a
failed call here always means a wrong answer and the fix is one token.

Recipe and measured cold start (2 shared CPU cores; the SFT time depends on what else runs)::

    python -m trainer.arith build runs/arith                      # ~5 s; 4000 train / 200 held out
    python -m trainer.sft --data runs/arith/coldstart/samples.jsonl --model runs/arith/base \\
        --out runs/arith/sft --lr 1e-3 --max-steps 1200 --batch-size 16 --warmup 20 --save-steps 10000
    python -m trainer.evaluate --model runs/arith/sft/final --benchmarks runs/arith/problems/heldout.jsonl \\
        --limit 100 --modes thor-rl --max-tokens 256 --max-model-len 1024 --dtype float32 --out runs/arith/eval-sft

Measured (seed 0, held-out 100, greedy, thor-rl through vLLM and the sandbox):

- seed 0, ``--guess nearby`` (the default): accuracy 0.41 (0.32-0.51), call success 0.49
  (print branch on 49 problems, 41 of them copied right; bare on 51); the same in bfloat16.
  SFT 1200 steps, final loss 0.13; 9 min on the shared cores, ~3.5 min when they are free
  (0.16 s/step). Its checkpoint at step 800 gave the same figures.
- seed 1, same recipe: accuracy 0.37 (0.28-0.46), call success 0.46 (final loss 0.13).
- seed 0, ``--guess rounded``: accuracy 0.49 (0.39-0.58), call success 0.49: every print
  trajectory copied its output right (final loss 0.05).
- Greedy never takes the ``direct`` branch (10% of the samples, never a style's majority):
  sampling explores it, greedy does not.

Copying the tool output into ``\\boxed{}`` is the fragile part: with nearby guesses the loss
sits at ~0.6, drops to ~0.25 (leading digits copied, the last one guessed: 628 -> 620) and
only later to ~0.15 (exact copies). 800 steps at lr 1e-3 (cosine over 800) and 600 steps at
lr 2e-3 both stopped before the last drop (accuracy 0.00, call success 0.49): check the
cold start before RL. Rounded guesses are learnable exactly, so they do not compete with
the copy; they are the safer choice for new seeds.
"""

from .build import ArithTask, build_task

__all__ = ["ArithTask", "build_task"]
