"""Which tool results may be cached, and under which key.

Owns: `tool_cache_key` (a digest of the sandbox fingerprint and the code) and
`is_cacheable` (a conservative AST check that a snippet's output does not depend on
time, randomness, the process or the outside world).

Does not own: storing results (the `Store` backends) or deciding which outcomes are
worth caching (server/tool_cache.py).
"""

from __future__ import annotations

import ast
import hashlib


def tool_cache_key(code: str, sandbox_fingerprint: str) -> str:
    """sha256 over a version tag, the sandbox fingerprint and the code (hex digest)."""
    h = hashlib.sha256(b"thor-tool-result-v1\0")
    fp = sandbox_fingerprint.encode()
    h.update(len(fp).to_bytes(8, "big") + fp)
    h.update(code.encode())
    return h.hexdigest()


# Modules whose import makes a snippet's output depend on time, randomness, the process
# or the outside world.
_NONDETERMINISTIC_MODULES = frozenset(
    {
        "random",
        "secrets",
        "time",
        "datetime",
        "uuid",
        "timeit",
        "tempfile",
        "zoneinfo",
        "threading",
        "multiprocessing",
        "concurrent",
        "asyncio",
        "subprocess",
        "socket",
        "urllib",
        "http",
        "requests",
        "httpx",
        "resource",
        "gc",
        "tracemalloc",
        "psutil",
        "faker",
        "hypothesis",
    }
)
# Attribute or name references that read randomness, clocks or process identity without
# importing one of the modules above (os.urandom, np.random.rand, sympy.randprime, ...).
_NONDETERMINISTIC_NAMES = frozenset(
    {
        "urandom",
        "getrandbits",
        "getpid",
        "getppid",
        "times",
        "shuffle",
        "default_rng",
        "uuid1",
        "uuid4",
        "now",
        "utcnow",
        "today",
        "perf_counter",
        "perf_counter_ns",
        "monotonic",
        "monotonic_ns",
        "process_time",
        "time_ns",
        "token_bytes",
        "token_hex",
    }
)
# Builtins whose result varies between runs: hash() of str/bytes (PYTHONHASHSEED),
# id() (addresses), input(); and dynamic code the check cannot see into.
_NONDETERMINISTIC_CALLS = frozenset({"hash", "id", "input", "eval", "exec", "compile", "__import__"})


def _nondeterministic_identifier(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("rand") or "random" in lowered or name in _NONDETERMINISTIC_NAMES


def is_cacheable(code: str) -> bool:
    """Whether a snippet's execution result may be cached (a conservative AST check).

    Not cacheable when the snippet does not parse, imports a module from
    `_NONDETERMINISTIC_MODULES` (random, secrets, time, datetime, uuid, threading,
    subprocess, network, ...; also `import numpy.random`, `from numpy import random`),
    references an identifier starting with "rand" or containing "random"
    (np.random.*, sympy.randprime, randMatrix, random_poly, SystemRandom, ...) or one of
    `_NONDETERMINISTIC_NAMES` (os.urandom, os.getpid, .now(), .today(), ...), uses the
    strings "now"/"today" (np.datetime64("now")), or calls hash(), id(), input(),
    eval(), exec(), compile(), __import__() or importlib.

    False positives only cost a cache miss. Known residual cases it cannot see: the
    printed order of a set of strings (depends on PYTHONHASHSEED) and default reprs
    with memory addresses (`<object at 0x...>`); callers should also cache only real
    results (not timeouts or sandbox failures).
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if (
                    parts[0] in _NONDETERMINISTIC_MODULES
                    or parts[0] == "importlib"
                    or any(_nondeterministic_identifier(p) for p in parts)
                ):
                    return False
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if parts[0] in _NONDETERMINISTIC_MODULES or parts[0] == "importlib":
                return False
            if any(_nondeterministic_identifier(p) for p in parts):
                return False
            if any(_nondeterministic_identifier(a.name) for a in node.names):
                return False
        elif isinstance(node, ast.Name):
            if _nondeterministic_identifier(node.id):
                return False
            if isinstance(node.ctx, ast.Load) and node.id in _NONDETERMINISTIC_CALLS:
                return False
        elif isinstance(node, ast.Attribute):
            if _nondeterministic_identifier(node.attr):
                return False
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.strip().lower() in {"now", "today"}:
                return False
    return True
