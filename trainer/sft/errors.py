"""The error of an SFT run that cannot start or continue.

Owns: `SftError`, raised by train.py (bad settings, output directory in the way) and
base_model.py (an output layer that cannot be untied), and caught by the CLI (__main__.py),
which prints it as one line and exits 1.

Does not own: the other stages' errors (`DataError` in data.py, `SegmentError` in
encode.py, `ExportError` in export.py).
"""

from __future__ import annotations

__all__ = ["SftError"]


class SftError(RuntimeError):
    """An SFT run that cannot start or continue (bad settings, output dir in the way)."""
