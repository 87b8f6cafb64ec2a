"""Hierarchical RL for THOR (`python -m trainer.rl`): trajectory-level and step-level GRPO.

Modules: `config` (the typed YAML config), `records` (the rollout data contract, verl-like),
`rollout` (groups sampled through the serving decoder on vLLM with the real sandbox),
`loss` (GRPO advantages, PPO-clip with dual clip and the NLL term), `learner` (the model
under accelerate: updates, weights out), `sync` (weights into the running vLLM engine, with a
log-prob probe), `runner` (the loop, checkpoints, metrics, evaluation), `plots`.
"""
