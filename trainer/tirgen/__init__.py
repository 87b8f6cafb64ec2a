"""TIRGen (``python -m trainer.tirgen``): tool-integrated reasoning data from an actor and a critic.

Modules: sample.py (the dataset schema: text segments + provenance), prompts.py (the
actor's, the critic's and the training prompt), endpoints.py (`Actor`, `Critic`: any text
completions endpoint; the critic's code really executed in the sandbox), generate.py (one
sample: the actor/critic loop), filters.py (the multi-stage filters and the funnel),
runner.py (a resumable, concurrent run and its reports), __main__.py (the CLI).

Does not own: training on the data (trainer/sft/), evaluation (trainer/evaluate/), the
train/eval split (trainer/splits.py).
"""
