"""The evaluation harness: `python -m trainer.evaluate` (THOR's tables on any model or endpoint).

Modules: `benchmarks` (the seven sets and any JSONL or local dataset, as `Problem`s),
`modes` (thor, thor-nosc, cot, tir-ref), `targets` (in process on vLLM, a THOR server,
any OpenAI-compatible chat endpoint), `client_loop` + `remote_backend` (the THOR loop run
here over an endpoint's `/v1/completions` with token ids), `runner` (concurrent, resumable,
scored samples), `records` (one JSON line per sample), `metrics` (Avg@k, maj@k, pass@k,
intervals, paired differences, the key-insight table) and `report` (summary JSON,
Markdown, plots).

The trainer calls `runner.run_evaluation` for validation with an `InProcessTarget` over the
same decoder it trains on. Nothing here generates text itself.
"""
