"""A synthetic arithmetic tool-use task and its from-scratch tiny model (THOR's RL demonstration).

Owns nothing itself; see task.py (problems, `build_task`), tokenizer.py, model.py and
coldstart.py. ``python -m trainer.arith build OUT`` writes the task directory.
"""

from .task import ArithTask, build_task

__all__ = ["ArithTask", "build_task"]
