"""Answer verification: does a predicted answer equal the gold one (math-verify pool).

Owns: :class:`AnswerChecker` (normalised string equality first, then math-verify/sympy
in worker processes under a hard deadline), the process-wide :func:`default_checker`
and the :func:`answers_match` / :func:`answers_match_async` shortcuts. Does not own:
extraction (:mod:`.extraction`), the normal form (:mod:`.normalisation`) or voting
(:mod:`.voting`).

math-verify guards its work with ``signal.alarm``, which only works in the main
thread, and sympy can run for ever on inputs such as towers of powers. So the
math-verify part runs in worker processes owned by :class:`AnswerChecker`, each call
under a hard deadline: a worker that overruns is killed, replaced on next use, and the
pair is scored as not equal. Nothing here can hang a caller.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import multiprocessing
import os
import queue
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Self

from .extraction import extract_boxed
from .normalisation import normalize_answer

__all__ = ["AnswerChecker", "answers_match", "answers_match_async", "default_checker"]

logger = logging.getLogger(__name__)

#: A whole answer written as a number in a base (``204_5``, ``4A3_12``), once normalised.
_BASE_NUMBER_RE = re.compile(r"^[0-9A-Z]+_\d+$")


def _warm_up() -> int:
    """Runs first in every worker: pay the sympy/antlr import once, report the pid."""
    from math_verify import parse

    parse("$1$")
    return os.getpid()


def _parse(text: str, seconds: int) -> list[object]:
    """math-verify parse of ``$text$``; the bare string only if the wrapped one is empty.

    Bare parsing is the fallback, not the first try: on a bare string math-verify
    often extracts a fragment (``(1, 2)`` parses as ``2``) instead of the whole answer.

    math-verify's own unit stripping is off (its defaults otherwise): it drops a trailing
    single letter from its unit list, so ``\\frac{37}{4} m`` (m a mass) would equal
    ``\\frac{37}{4}`` and ``\\frac{1}{\\sqrt{2}}c`` would equal ``\\frac{1}{\\sqrt{2}}``.
    Units are removed by :func:`.normalize_answer` instead, where the rules are ours.
    """
    from latex2sympy2_extended.math_normalization import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    normalization = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
    )
    config = [LatexExtractionConfig(normalization_config=normalization), ExprExtractionConfig()]
    return parse(f"${text}$", extraction_config=config, parsing_timeout=seconds) or parse(
        text, extraction_config=config, parsing_timeout=seconds
    )


def _verify_in_worker(pairs: list[tuple[str, str]], seconds: int) -> bool | None:
    """True/False from math-verify for any (gold, pred) form; None if nothing parsed."""
    from math_verify import verify

    decided = False
    for gold, pred in pairs:
        gold_parsed, pred_parsed = _parse(gold, seconds), _parse(pred, seconds)
        if not gold_parsed or not pred_parsed:
            continue
        decided = True
        if verify(gold_parsed, pred_parsed, timeout_seconds=seconds):
            return True
    return False if decided else None


class _Worker:
    """One single-process pool; killable as a unit without touching other workers."""

    def __init__(self, startup_timeout: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(max_workers=1, mp_context=context)
        self.pid: int | None = None
        try:
            self.pid = self.executor.submit(_warm_up).result(timeout=startup_timeout)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        # The pid comes from the warm-up; if that never answered, fall back to the
        # executor's (private, long-stable) process table.
        if self.pid is not None:
            pids = [self.pid]
        else:
            pids = [p.pid for p in (self.executor._processes or {}).values() if p.pid is not None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class AnswerChecker:
    """Decides whether a predicted answer equals a gold answer; owns the worker processes.

    Fast path in the caller's thread: equal :func:`normalize_answer` forms match, and an
    empty form never does. Otherwise math-verify runs in a worker on the normalised and
    the raw forms (each wrapped as ``$...$``, gold first since ``verify`` is asymmetric).
    When a side parses to nothing, the result is normalised string equality (False by
    then). Two numbers written in a base (``204_5``, ``204_6``) are compared as strings
    only, since math-verify drops the subscript. A worker past the ``timeout`` deadline
    is killed, the pair scores False, and a fresh worker is spawned on next use. Workers are created lazily, at most
    ``max_workers``; waiting for a free one is not counted in ``timeout``.

    Thread-safe. Use as a context manager or call :meth:`close`. Workers are spawned
    (not forked), so a script using this needs the ``if __name__ == "__main__":`` guard;
    without it the first worker fails to start and the call raises ``BrokenProcessPool``.
    """

    def __init__(self, max_workers: int = 2, startup_timeout: float = 120.0) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.startup_timeout = startup_timeout
        self.worker_kills = 0  # workers killed for overrunning a deadline or crashing
        self._closed = False
        self._lock = threading.Lock()
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(max_workers):
            self._slots.put(None)  # None: no process yet, spawn on first use

    def answers_match(self, pred: str, gold: str, timeout: float = 5.0) -> bool:
        """Whether ``pred`` equals ``gold``; False on timeout. Blocks up to ``timeout``."""
        norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
        if not norm_pred or not norm_gold or norm_pred == norm_gold:
            return bool(norm_pred) and norm_pred == norm_gold
        if _BASE_NUMBER_RE.match(norm_pred) and _BASE_NUMBER_RE.match(norm_gold):
            return False  # 204_5 vs 204_6: math-verify drops the base subscript
        pairs = [(norm_gold, norm_pred)]
        raw_pred, raw_gold = _light_clean(pred), _light_clean(gold)
        if (raw_gold, raw_pred) != (norm_gold, norm_pred):
            pairs.append((raw_gold, raw_pred))
        verdict = self._run_verify(pairs, timeout)
        return verdict if verdict is not None else norm_pred == norm_gold

    async def answers_match_async(self, pred: str, gold: str, timeout: float = 5.0) -> bool:
        """:meth:`answers_match` without blocking the event loop."""
        norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
        if not norm_pred or not norm_gold or norm_pred == norm_gold:
            return bool(norm_pred) and norm_pred == norm_gold
        return await asyncio.to_thread(self.answers_match, pred, gold, timeout)

    def close(self) -> None:
        """Stop all worker processes. Idempotent; later calls to match raise RuntimeError."""
        with self._lock:
            self._closed = True
        drained: list[_Worker | None] = []
        while True:
            try:
                drained.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for worker in drained:
            if worker is not None:
                worker.close()
            self._slots.put(None)  # wakes any waiting caller, which then sees _closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run_verify(self, pairs: list[tuple[str, str]], timeout: float) -> bool | None:
        worker = self._acquire()
        returned: _Worker | None = worker  # what goes back to the pool
        try:
            # math-verify's own per-operation alarm (whole seconds) fires a little before
            # the hard deadline when sympy is interruptible, which spares a respawn.
            inner_seconds = max(1, math.floor(timeout * 0.8))
            future = worker.executor.submit(_verify_in_worker, pairs, inner_seconds)
            return future.result(timeout=timeout)
        except (TimeoutError, BrokenProcessPool) as exc:
            logger.warning("answer check abandoned (%s); killing worker %s", type(exc).__name__, worker.pid)
            worker.kill()
            returned = None
            with self._lock:
                self.worker_kills += 1
            return False
        finally:
            self._release(returned)

    def _acquire(self) -> _Worker:
        worker = self._slots.get()
        if self._closed:
            self._slots.put(worker)
            raise RuntimeError("AnswerChecker is closed")
        if worker is not None:
            return worker
        try:
            return _Worker(self.startup_timeout)
        except BaseException:
            self._slots.put(None)
            raise

    def _release(self, worker: _Worker | None) -> None:
        if self._closed and worker is not None:
            worker.close()
            worker = None
        self._slots.put(worker)


def _light_clean(s: str) -> str:
    """The answer as written, minus a surrounding box and ``$`` signs (for math-verify)."""
    s = s.strip()
    boxed = extract_boxed(s)
    return (boxed if boxed is not None else s).replace("$", "").strip()


# ------------------------------------------------------------------ default instance

_default_checker: AnswerChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> AnswerChecker:
    """The process-wide checker behind :func:`answers_match`, made on first use.

    It is the module's only global state; it is closed at interpreter exit. Code that
    wants its own pool size or lifetime should create an :class:`AnswerChecker`.
    """
    global _default_checker
    with _default_lock:
        if _default_checker is None:
            _default_checker = AnswerChecker()
            atexit.register(_default_checker.close)
        return _default_checker


def answers_match(pred: str, gold: str, timeout: float = 5.0) -> bool:
    """Whether ``pred`` equals ``gold``, via :func:`default_checker`."""
    return default_checker().answers_match(pred, gold, timeout)


async def answers_match_async(pred: str, gold: str, timeout: float = 5.0) -> bool:
    """Async :func:`answers_match`, via :func:`default_checker`."""
    return await default_checker().answers_match_async(pred, gold, timeout)
