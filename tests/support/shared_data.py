"""Locate the project's shared data (published OpenAI and Compose schemas, benchmark sets).

The data lives beside the checkout (`../shared/data`), which on CI machines may be a
clone in another directory: `THOR_SHARED_DATA_DIR` overrides, then `../shared/data`,
then the workplace's `/work/shared/data`.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    candidates = [Path(p) for p in (os.environ.get("THOR_SHARED_DATA_DIR"),) if p]
    candidates += [ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if (c / "schemas").is_dir():
            return c
    raise FileNotFoundError(
        "shared data not found (looked in " + ", ".join(map(str, candidates)) + "); set THOR_SHARED_DATA_DIR"
    )


def schema_path(name: str) -> Path:
    return shared_data_dir() / "schemas" / name
