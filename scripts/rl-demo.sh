#!/usr/bin/env bash
# The hierarchical-RL demonstration of docs/training.md on this machine kind (2 cores, no GPU), end to end:
#   1. the synthetic arithmetic tool-use task and a from-scratch ~1M-parameter model (trainer.arith),
#   2. its cold-start SFT (trainer.sft),
#   3. RL with trajectory + step-level groups (trainer.rl, trainer/configs/rl/arith-demo.yaml),
#   4. the ablation: the same RL with trajectory-level groups only,
#   5. held-out greedy evaluations of the three checkpoints (trainer.evaluate, mode thor-rl),
#      and paired comparisons with intervals.
# Everything goes through the real decoder, vLLM (CPU) and the sandbox. Usage:
#   scripts/rl-demo.sh [OUT]        (default runs/rl-demo; `make rl-demo`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/rl-demo}
PY=${PY:-.venv/bin/python}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} TQDM_DISABLE=${TQDM_DISABLE:-1}
SFT_ARGS=(--lr 1e-3 --max-steps 1200 --batch-size 16 --lr-scheduler cosine --warmup 20 --seed 0)
TASK=$OUT/task
HELDOUT=$TASK/problems/heldout.jsonl
mkdir -p "$OUT"
stage() { echo "[rl-demo] $(date -u +%H:%M:%S) $*" | tee -a "$OUT/timeline.txt"; }

stage "task: problems, tokenizer, from-scratch model, cold-start samples"
$PY -m trainer.arith build "$TASK"
stage "cold-start SFT"
$PY -m trainer.sft --data "$TASK/coldstart/samples.jsonl" --model "$TASK/base" --out "$OUT/sft" --overwrite \
  --no-progress "${SFT_ARGS[@]}"
rl() {  # rl NAME [flags]
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  $PY -m trainer.rl --config trainer/configs/rl/arith-demo.yaml --model "$OUT/sft/final" \
    --problems "$TASK/problems/train.jsonl" --out "$OUT/$name" --set "eval.benchmarks=$HELDOUT" --no-progress "$@"
}
stage "RL: trajectory + step-level groups"
rl rl
stage "RL ablation: trajectory-level groups only"
rl rl-traj-only --no-step-level
evaluate() {  # evaluate NAME MODEL
  rm -rf "${OUT:?}/eval/$1"
  $PY -m trainer.evaluate --model "$2" --benchmarks "$HELDOUT" --modes thor-rl --max-tokens 256 \
    --max-model-len 1024 --dtype float32 --out "$OUT/eval/$1" --no-progress
}
stage "held-out evaluation (greedy, thor-rl): SFT, RL, RL trajectory-only"
evaluate sft "$OUT/sft/final"
evaluate rl "$OUT/rl/final"
evaluate rl-traj-only "$OUT/rl-traj-only/final"
$PY -m trainer.evaluate --compare "$OUT/eval/sft" "$OUT/eval/rl"
cp "$OUT/eval/rl/compare.md" "$OUT/compare-sft-vs-rl.md"
$PY -m trainer.evaluate --compare "$OUT/eval/rl-traj-only" "$OUT/eval/rl"
cp "$OUT/eval/rl/compare.md" "$OUT/compare-traj-only-vs-rl.md"
stage "done"
