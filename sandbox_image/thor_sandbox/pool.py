"""The warm worker pool: admission, scheduling, replacement, and result judging.

Owns: N jailed workers, the bounded wait for a free one (a `Busy` error past the
queue bound or the queue timeout), replacing a worker after a crash, a timeout, a
dirty /tmp or `snippets_per_worker` snippets, turning the worker's raw frame into
an `ExecutionResult` with one `Outcome`, and the pool's metrics.

Does not own: HTTP (app.py) or the jail's configuration (jail.py). Snippets are
stateless: any worker may run any snippet, and no state survives between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from .metrics import SandboxMetrics
from .protocol import ExecutionResult, Outcome, Snippet, WorkerStatus
from .settings import SandboxSettings
from .worker import JailWorker, WorkerDied

log = logging.getLogger("thor_sandbox.pool")


class Busy(RuntimeError):
    """Every worker is busy and the wait queue is full (or the wait timed out)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PoolClosed(RuntimeError):
    """The pool is shutting down or could not keep any worker alive."""


class WorkerPool:
    def __init__(
        self,
        settings: SandboxSettings,
        worker_factory: Callable[[], JailWorker],
        metrics: SandboxMetrics,
    ) -> None:
        self._settings = settings
        self._factory = worker_factory
        self._metrics = metrics
        self._idle: asyncio.Queue[JailWorker] = asyncio.Queue()
        self._busy: set[JailWorker] = set()
        self._live: dict[int, JailWorker] = {}  # idle and busy workers, by id
        self._versions: dict[str, str] = {}
        self._starting = 0
        self._waiting = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._consecutive_start_failures = 0

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise if none can start (the service must not run)."""
        results = await asyncio.gather(
            *(self._start_one() for _ in range(self._settings.pool_size)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise PoolClosed(f"no sandbox worker could start: {errors[0]}")
        for err in errors:
            log.error("a worker failed to start (pool runs degraded; retrying in background): %s", err)
            self._spawn_replacement("start_failed")
        self._update_gauges()

    async def _start_one(self) -> None:
        self._starting += 1
        worker = self._factory()
        try:
            await worker.start(self._settings.worker_start_timeout_s)
        finally:
            self._starting -= 1
        if self._closed:
            await worker.kill()
            return
        self._consecutive_start_failures = 0
        self._versions = self._versions or dict(worker.info.versions)
        self._live[worker.id] = worker
        self._idle.put_nowait(worker)
        self._update_gauges()

    def _spawn_replacement(self, reason: str) -> None:
        self._metrics.worker_restarts.labels(reason=reason).inc()

        async def replace() -> None:
            delay = 0.0
            while not self._closed:
                try:
                    await asyncio.sleep(delay)
                    await self._start_one()
                    return
                except Exception as exc:  # noqa: BLE001 - logged; retried with backoff
                    self._consecutive_start_failures += 1
                    delay = min(30.0, 0.5 * 2 ** min(self._consecutive_start_failures, 6))
                    log.error("replacement worker failed to start (retry in %.1fs): %s", delay, exc)

        task = asyncio.create_task(replace())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        workers = list(self._busy)
        while not self._idle.empty():
            workers.append(self._idle.get_nowait())
        await asyncio.gather(*(w.kill() for w in workers), return_exceptions=True)
        self._busy.clear()
        self._live.clear()
        self._update_gauges()

    # --- state -----------------------------------------------------------------------

    @property
    def ready(self) -> int:
        return self._idle.qsize() + len(self._busy)

    @property
    def busy(self) -> int:
        return len(self._busy)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def versions(self) -> dict[str, str]:
        """Interpreter and library versions the first started worker reported."""
        return dict(self._versions)

    def workers(self) -> list[WorkerStatus]:
        """The live workers; a replaced worker reappears under a new id and pid."""
        return [WorkerStatus(id=w.id, pid=w.pid, busy=w in self._busy) for _, w in sorted(self._live.items())]

    def _update_gauges(self) -> None:
        self._metrics.workers.labels(state="idle").set(self._idle.qsize())
        self._metrics.workers.labels(state="busy").set(len(self._busy))
        self._metrics.workers.labels(state="starting").set(self._starting)
        self._metrics.queue_depth.set(self._waiting)

    # --- running ---------------------------------------------------------------------

    def _retry_after(self) -> float:
        return max(1.0, math.ceil(self._settings.default_timeout_s / 2))

    async def _acquire(self) -> JailWorker:
        if self._closed:
            raise PoolClosed("the sandbox pool is shutting down")
        if self._idle.empty() and self._waiting >= self._settings.max_queue:
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise Busy(
                f"sandbox busy: all {self._settings.pool_size} workers are running snippets and "
                f"{self._waiting} requests are already waiting (max_queue={self._settings.max_queue}); retry later",
                self._retry_after(),
            )
        self._waiting += 1
        self._update_gauges()
        try:
            worker = await asyncio.wait_for(self._idle.get(), self._settings.queue_timeout_s)
        except TimeoutError:
            self._metrics.rejected.labels(reason="queue_timeout").inc()
            raise Busy(
                f"sandbox busy: no worker became free within {self._settings.queue_timeout_s:.0f}s; retry later",
                self._retry_after(),
            ) from None
        finally:
            self._waiting -= 1
        self._busy.add(worker)
        self._update_gauges()
        return worker

    def _release(self, worker: JailWorker, replace_reason: str | None) -> None:
        self._busy.discard(worker)
        if replace_reason is None and not self._closed:
            self._idle.put_nowait(worker)
        else:
            self._live.pop(worker.id, None)
            task = asyncio.create_task(worker.kill())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if not self._closed:
                self._spawn_replacement(replace_reason or "closed")
        self._update_gauges()

    def _limits(self, memory_mb: int | None) -> dict:
        s = self._settings
        return {
            "memory_bytes": (memory_mb or s.memory_limit_mb) * 1024 * 1024,
            "processes": s.max_processes,
            "open_files": s.max_open_files,
            "file_size_bytes": s.max_file_size_mb * 1024 * 1024,
            "output_bytes": s.max_output_bytes,
        }

    async def run(self, snippet: Snippet, memory_mb: int | None = None) -> ExecutionResult:
        """Run one snippet on a free worker (waiting in the bounded queue if needed)."""
        timeout = min(snippet.timeout or self._settings.default_timeout_s, self._settings.max_timeout_s)
        request = {
            "code": snippet.code,
            "echo": snippet.echo_last_expression,
            "stdin": snippet.stdin,
            "timeout": timeout,
            "limits": {**self._limits(memory_mb), "cpu_seconds": max(1, math.ceil(timeout))},
        }
        t_queue = time.monotonic()
        worker = await self._acquire()
        queued = time.monotonic() - t_queue
        replace_reason: str | None = "cancelled"
        try:
            try:
                raw = await worker.run(request, timeout)
            except WorkerDied as exc:
                log.error("%s; replacing it", exc)
                replace_reason = "crash"
                self._metrics.executions.labels(outcome="sandbox_error").inc()
                raise
            result = self._judge(raw, queued)
            replace_reason = None
            if raw.get("recycle"):
                replace_reason = "dirty"
            elif result.outcome in (Outcome.timeout, Outcome.oom):
                replace_reason = result.outcome.value
            elif worker.snippets_run >= self._settings.snippets_per_worker:
                replace_reason = "recycled"
            self._metrics.executions.labels(outcome=result.outcome.value).inc()
            self._metrics.duration.labels(outcome=result.outcome.value).observe(result.duration_s)
            return result
        finally:
            self._release(worker, replace_reason)

    @staticmethod
    def _judge(raw: dict, queued: float) -> ExecutionResult:
        if "internal_error" in raw:
            raise WorkerDied(f"worker internal error: {raw['internal_error']}")
        if raw["timed_out"]:
            outcome = Outcome.timeout
        elif raw["output_capped"]:
            outcome = Outcome.output_capped
        elif raw["oom"]:
            outcome = Outcome.oom
        elif raw["exit_code"] == 0:
            outcome = Outcome.ok
        else:
            outcome = Outcome.error
        return ExecutionResult(
            outcome=outcome,
            ok=outcome is Outcome.ok,
            exit_code=raw["exit_code"],
            signal=raw["signal"],
            stdout=raw["stdout"],
            stderr=raw["stderr"],
            stdout_truncated=raw["stdout_truncated"],
            stderr_truncated=raw["stderr_truncated"],
            duration_s=raw["duration_s"],
            queue_s=queued,
        )

    async def run_many(self, snippets: list[Snippet]) -> list[ExecutionResult]:
        """Run independent snippets concurrently; results in input order."""
        tasks = [asyncio.create_task(self.run(s)) for s in snippets]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
