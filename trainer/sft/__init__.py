"""Cold-start SFT (``python -m trainer.sft``): train on tool-integrated trajectories, export a served checkpoint.

Modules: encode.py (segments -> ids + labels, exactly as the decoder appends tokens),
data.py (TIRGen samples.jsonl / saved datasets -> a tokenised ``datasets.Dataset``,
length drops counted), base_model.py (`load_base_model`: the base model with its output
layer untied, also what the RL learner loads), train.py (`SftConfig`, `run_sft`: HF
Trainer on accelerate, optional peft LoRA, resume), export.py (the untied safetensors
checkpoint with tokenizer, chat template, generation config and model card), report.py
(train_log.json, loss.png), errors.py (`SftError`), __main__.py (the CLI).

Does not own: generating data (trainer/tirgen/), evaluation (trainer/evaluate/), serving (server/).
"""
