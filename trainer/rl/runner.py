"""The hierarchical-RL loop: rollouts, update, weight sync, metrics, checkpoints, evaluation.

Owns: one run of `python -m trainer.rl` in a run directory. Per step, on the main
process: trajectory-level groups in rounds until the batch holds `groups_per_step` kept
groups or `max_rounds` are spent (dynamic sampling: dropped groups are replaced by new
problems), then step-level groups cut from this step's failed rollouts, all through the
serving decoder on the in-process vLLM engine; GRPO advantages per group; the batch is
broadcast to every process and the learner updates (DDP under `accelerate launch`); the
new weights are reloaded into vLLM and probed (sync.py); the gap between vLLM's sampled
log-probs and the learner's old ones on the trained tokens is logged per step and bounded
(engine.rollout_logprob_tolerance: the learner refuses to step on rollouts another policy sampled). Every step appends a line to
`metrics.jsonl` and redraws `metrics.png`; every `checkpoint_every` steps a servable
checkpoint (`checkpoints/step-N/`, Hugging Face format, untied) plus the learner's and
the loop's state for `--resume`; a held-out evaluation through `trainer.evaluate`'s
runner on the live engine before training, every `eval.every` steps and at the end.

Layout of a run directory::

    config.yaml         the resolved configuration (resume refuses another)
    metrics.jsonl       one JSON object per step
    metrics.png         the curves
    rollouts/step-N.jsonl.gz   every rollout of the step (kept or not), when schedule.log_rollouts
    checkpoints/step-N/ a servable model + state/ (learner) + loop.json
    final -> checkpoints/step-<last>
    eval/step-N/        trainer.evaluate's run directory (records, summary, tables)

Does not own: sampling a group (rollout.py), the loss and the optimiser (loss.py,
learner.py), moving weights into vLLM (sync.py), or the CLI (__main__.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import RlConfig
from .records import RolloutRecord
from .rollout import GroupResult, Rollout, RolloutWorker, gather_groups, prompt_ids_for

__all__ = ["RlRunError", "engine_options", "run_rl"]

log = logging.getLogger("trainer.rl")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LOOP_STATE = "loop.json"


class RlRunError(RuntimeError):
    """The run cannot start or go on; the message says why and what to do."""


@dataclass
class _Problems:
    """An endless, seeded, shuffled stream of training problems; its position is saved for resume."""

    items: list[Any]
    seed: int
    cursor: int = 0

    _order: tuple[int, list[int]] | None = None  # (epoch, its shuffled order), drawn once per epoch

    def take(self, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.items))
            if self._order is None or self._order[0] != epoch:
                order = list(range(len(self.items)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                self._order = (epoch, order)
            out.append(self.items[self._order[1][pos]])
            self.cursor += 1
        return out


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / LOOP_STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _check_run_dir(cfg: RlConfig, out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); refuse a used directory or a changed config."""
    saved = out / CONFIG_FILE
    if not resume:
        if (out / METRICS_FILE).exists() or _checkpoints(out):
            raise RlRunError(f"{out} holds an earlier run: pass --resume to continue it, or choose another out")
        return None
    if not saved.exists():
        raise RlRunError(f"--resume: {out} holds no {CONFIG_FILE}; start without --resume")
    before = RlConfig.model_validate(yaml.safe_load(saved.read_text()))
    if _resumable(before) != _resumable(cfg):
        raise RlRunError(
            f"--resume: the configuration differs from the one {out} was started with ({saved}); "
            "resume with the same config and flags (schedule.steps may grow), or choose another out"
        )
    ckpts = _checkpoints(out)
    return ckpts[-1] if ckpts else None


def _resumable(cfg: RlConfig) -> dict[str, Any]:
    """What must not change on resume: everything but the number of steps (a run may be extended)."""
    d = cfg.model_dump(mode="json")
    d["schedule"].pop("steps")
    return d


def _summarise_trajectories(groups: list[GroupResult]) -> dict[str, Any]:
    rollouts = [r for g in groups for r in g.rollouts]
    calls = sum(r.calls for r in rollouts)
    ok = sum(r.ok_calls for r in rollouts)
    sandbox = sum(r.sandbox_errors for r in rollouts)
    ran = calls - sandbox  # calls the sandbox ran: a sandbox failure is not the code's
    n = max(1, len(rollouts))
    return {
        "rollouts": len(rollouts),
        "accuracy": sum(r.correct for r in rollouts) / n,
        "reward": sum(r.reward for r in rollouts if r.drop is None) / max(1, sum(r.drop is None for r in rollouts)),
        "tool_success": ok / ran if ran else None,
        "sandbox_errors": sandbox,
        "code_use": sum(r.calls > 0 for r in rollouts) / n,
        "calls_per_rollout": calls / n,
        "response_tokens": sum(len(r.response_ids) for r in rollouts) / n,
        "reencoded_tokens": sum(r.reencoded for r in rollouts),
        "groups": len(groups),
        "groups_kept": sum(g.kept for g in groups),
        "group_drops": dict(Counter(g.reason.split(" (")[0] for g in groups if g.reason)),
        "rollout_drops": dict(Counter(r.drop for r in rollouts if r.drop)),
    }


def _summarise_steps(groups: list[GroupResult]) -> dict[str, Any]:
    rollouts = [r for g in groups for r in g.rollouts]
    reached = [r for r in rollouts if r.drop is None]
    return {
        "groups": len(groups),
        "groups_kept": sum(g.kept for g in groups),
        "group_drops": dict(Counter(g.reason.split(" (")[0] for g in groups if g.reason)),
        "continuations": len(rollouts),
        "reached_code": len(reached) / max(1, len(rollouts)),
        "code_success": sum(r.reward for r in reached) / len(reached) if reached else None,
        "sandbox_errors": sum(r.sandbox_errors for r in rollouts),
        "reencoded_tokens": sum(r.reencoded for r in rollouts),
    }


def _rollout_line(g: GroupResult, r: Rollout) -> str:
    return json.dumps(
        {
            "group": g.group,
            "level": g.level,
            "problem_id": g.problem.id,
            "group_dropped": g.reason,
            "drop": r.drop,
            "reward": r.reward,
            "correct": r.correct,
            "answer": r.answer,
            "gold": g.problem.answer,
            "finish_reason": r.finish_reason,
            "calls": r.calls,
            "ok_calls": r.ok_calls,
            "sandbox_errors": r.sandbox_errors,
            "reencoded_tokens": r.reencoded,
            "prompt_tokens": len(r.prompt_ids),
            "response_tokens": len(r.response_ids),
            "text": r.text,
        }
    )


class _Main:
    """Everything only the main process holds: engine, sandbox, decoder, sync, problem stream."""

    def __init__(self, cfg: RlConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.stack = contextlib.AsyncExitStack()
        self.worker: RolloutWorker | None = None
        self.backend: Any = None
        self.executor: Any = None
        self.sync: Any = None
        self.checker: Any = None
        self.problems: _Problems | None = None
        self.trained: Any = None  # the TrainingProblems of this run's checkpoints

    async def open(self, policy_dir: Path, learner: Any) -> None:
        from thor_engine.answer import AnswerChecker
        from thor_engine.backends.vllm_backend import VllmBackend
        from thor_engine.cli.local_sandbox import LocalSandboxError, sandbox_at
        from thor_engine.decoder import ThorDecoder
        from thor_engine.tools import SandboxExecutor, SandboxPolicy
        from thor_sandbox.client import SandboxClient

        from .sync import WeightSync

        cfg = self.cfg
        try:
            url = await self.stack.enter_async_context(
                sandbox_at(cfg.engine.sandbox_url, pool_size=cfg.engine.sandbox_pool)
            )
        except LocalSandboxError as exc:
            raise RlRunError(f"no sandbox: {exc}") from exc
        client = await self.stack.enter_async_context(SandboxClient(url))
        self.executor = SandboxExecutor(client, SandboxPolicy(max_concurrent_per_request=cfg.engine.sandbox_pool))
        opts = engine_options(cfg, policy_dir)
        try:
            self.backend = await VllmBackend.start(opts)
        except Exception as exc:  # vLLM raises many kinds; one line for the operator
            raise RlRunError(f"vLLM could not load {policy_dir}: {type(exc).__name__}: {exc}") from exc
        self.stack.callback(self.backend.shutdown)
        self.checker = AnswerChecker(max_workers=1)
        self.stack.callback(self.checker.close)
        decoder = ThorDecoder(self.backend, self.executor)
        self.worker = RolloutWorker(
            decoder, self.checker, cfg.trajectory, cfg.step, sandbox_slots=cfg.engine.sandbox_pool
        )
        # the probe: the first training problem's prompt plus a fixed continuation
        assert self.problems is not None
        tok = self.backend.tokenizer
        probe_prompt = prompt_ids_for(tok, self.problems.items[0])
        probe_tail = tok.encode(
            "I will compute it with Python.\n```python\nprint(1 + 2)\n```\n", add_special_tokens=False
        )
        self.sync = WeightSync(
            self.backend.engine,
            probe_prompt + probe_tail,
            len(probe_prompt),
            cfg.engine.probe_tolerance,
            cfg.engine.probe_change_tolerance,
        )
        self.stack.callback(self.sync.close)
        res = await self.sync.probe(learner.probe_logprobs)
        log.info("probe before training: |dlogp| max %.2e mean %.2e", res.max_abs, res.mean_abs)

    async def close(self) -> None:
        await self.stack.aclose()

    async def collect(self, step: int) -> tuple[list[RolloutRecord], dict[str, Any], list[GroupResult]]:
        cfg, worker = self.cfg, self.worker
        assert worker is not None and self.problems is not None
        tcfg, scfg = cfg.trajectory, cfg.step
        limit = max(1, cfg.engine.concurrency // tcfg.group_size)
        traj_groups: list[GroupResult] = []
        kept: list[GroupResult] = []
        rounds = 0
        while len(kept) < tcfg.groups_per_step and rounds < tcfg.max_rounds:
            need = tcfg.groups_per_step - len(kept)
            problems = self.problems.take(need)
            base = len(traj_groups)
            coros = [
                worker.trajectory_group(p, f"s{step}-t{base + i}", _seed(cfg.schedule.seed, step, base + i))
                for i, p in enumerate(problems)
            ]
            results = await gather_groups(coros, limit)
            traj_groups.extend(results)
            kept.extend(g for g in results if g.kept)
            rounds += 1
        step_groups: list[GroupResult] = []
        if scfg.enabled and scfg.max_groups_per_step > 0:
            rng = random.Random(_seed(cfg.schedule.seed, step, -1))
            pool = [(g, r) for g in traj_groups for r in g.rollouts if r.failed_block is not None]
            rng.shuffle(pool)
            sources = [(g.problem, r, r.failed_block) for g, r in pool[: scfg.max_groups_per_step]]
            if not sources:
                picked = worker.step_source([r for g in traj_groups for r in g.rollouts], rng)
                if picked is not None:
                    r, fence = picked
                    g = next(g for g in traj_groups if r in g.rollouts)
                    sources = [(g.problem, r, fence)]
            coros = [
                worker.step_group(p, r, fence, f"s{step}-c{i}", _seed(cfg.schedule.seed, step, 10_000 + i))
                for i, (p, r, fence) in enumerate(sources)
            ]
            step_groups = await gather_groups(coros, max(1, cfg.engine.concurrency // scfg.group_size))
        records = [rec for g in traj_groups + step_groups for rec in g.records]
        metrics = {
            "trajectory": {**_summarise_trajectories(traj_groups), "rounds": rounds},
            "step_level": _summarise_steps(step_groups),
            "records": len(records),
            "records_step_level": sum(r.level == "step" for r in records),
            "trained_tokens": sum(r.trained_tokens for r in records),
        }
        return records, metrics, traj_groups + step_groups

    async def evaluate(self, step: int) -> dict[str, Any] | None:
        ev = self.cfg.eval
        if not ev.benchmarks:
            return None
        from thor_engine.engine import ThorEngine
        from trainer.evaluate.__main__ import report
        from trainer.evaluate.modes import parse_modes
        from trainer.evaluate.records import RunSpec
        from trainer.evaluate.runner import run_evaluation
        from trainer.evaluate.targets import InProcessTarget

        out = self.out / "eval" / f"step-{step}"
        if out.exists():
            shutil.rmtree(out)  # a step re-run after resume replaces its partial evaluation
        names, problems = _eval_problems(self.cfg)
        if self.trained is not None:  # checked at the start too; the trained set cannot grow during a run
            _check_eval_overlap(self.cfg, problems, self.trained)
        modes = parse_modes(ev.modes)
        model_name = f"rl-step-{step}"
        engine = ThorEngine(self.backend, self.executor, model_name)
        spec = RunSpec(
            model=model_name,
            target="in-process",
            benchmarks=names,
            modes=[m.name for m in modes],
            k=1,
            temperature=0.0,
            top_p=1.0,
            max_tokens=ev.max_tokens,
            seed=self.cfg.schedule.seed,
            offset=0,
            limit=ev.limit,
        )
        await run_evaluation(
            InProcessTarget(engine, model_name),
            problems,
            modes,
            spec,
            out,
            concurrency=ev.concurrency,
            progress=False,
            checker=self.checker,
        )
        report(out, names, spec.modes, self.cfg.schedule.seed, 1)
        summary = json.loads((out / "summary.json").read_text())
        res = {}
        for row in summary["results"]:
            key = f"{row['benchmark']}/{row['mode']}"
            res[key] = {
                "accuracy": row["avg_at_k"]["value"],
                "accuracy_low": row["avg_at_k"]["low"],
                "accuracy_high": row["avg_at_k"]["high"],
                "tool_success": row["tools"]["call_success_rate"],
                "calls_per_sample": row["tools"]["calls_per_sample"],
            }
        return res


def engine_options(cfg: RlConfig, policy_dir: Path) -> Any:
    """The in-process vLLM engine's options: its share of a GPU next to the learner
    (engine.gpu_memory_utilization), and sampled log-probs of the distribution it samples from
    (logprobs_mode processed_logprobs: after temperature, as the learner's; vLLM's default is the raw
    distribution's). Prompt log-probs (the probe) are raw in either mode."""
    from thor_engine.backends.vllm_backend import EngineOptions

    return EngineOptions(
        model=str(policy_dir),
        dtype=cfg.engine.dtype,
        max_model_len=cfg.engine.max_model_len,
        enforce_eager=cfg.engine.enforce_eager,
        max_num_seqs=cfg.engine.max_num_seqs,
        seed=cfg.schedule.seed,
        gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
        extra={"logprobs_mode": "processed_logprobs"},
    )


def _eval_problems(cfg: RlConfig) -> tuple[list[str], list[Any]]:
    """The held-out evaluation's benchmark names and problems (eval.benchmarks, eval.limit each)."""
    from trainer.evaluate.benchmarks import load_benchmark, select

    ev = cfg.eval
    names = [n.strip() for n in (ev.benchmarks or "").split(",") if n.strip()]
    fields = {"problem_field": ev.problem_field, "answer_field": ev.answer_field, "id_field": ev.id_field}
    problems: list[Any] = []
    for name in names:
        problems += select(load_benchmark(name, **{k: v for k, v in fields.items() if v}), limit=ev.limit)
    return names, problems


def _check_eval_overlap(cfg: RlConfig, problems: list[Any], trained: Any) -> None:
    """The evaluate command's check (trainer.splits.check_no_overlap): refuse to score problems the
    checkpoints are trained on (the starting checkpoint's and this run's), unless eval.allow_train_overlap."""
    from trainer.splits import SplitError, check_no_overlap

    if cfg.eval.allow_train_overlap:
        return
    try:
        check_no_overlap(
            problems,
            trained,
            model=f"the RL run {cfg.out}",
            fix="Set eval.benchmarks to held-out problems, or eval.allow_train_overlap: true to score them anyway",
        )
    except SplitError as exc:
        raise RlRunError(str(exc)) from exc


def _seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31)


def _broadcast(accelerator: Any, obj: Any) -> Any:
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="rl steps", unit="step", disable=not enabled, dynamic_ncols=True)


async def run_rl(cfg: RlConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) the configured RL run; returns the final checkpoint's directory."""
    from accelerate import Accelerator

    from trainer.evaluate.benchmarks import BENCHMARKS, load_benchmark, select
    from trainer.splits import split_of

    from .learner import Learner
    from .loss import group_advantages
    from .plots import plot_metrics

    out = Path(cfg.out)
    accelerator = Accelerator(cpu=not _cuda())
    main = accelerator.is_main_process
    log.info(
        "[rl] process %d of %d (%s, %s)",
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.distributed_type,
        accelerator.device,
    )
    start_ckpt = _check_run_dir(cfg, out, resume) if main else None
    start_ckpt = _broadcast(accelerator, start_ckpt)
    step0, cursor = 0, 0
    if start_ckpt is not None:
        loop = json.loads((start_ckpt / LOOP_STATE).read_text())
        step0, cursor = loop["step"], loop["cursor"]
    if main:
        _write_config(out, cfg)
        if resume:  # the steps after the checkpoint are redone: their lines go (all of them without one,
            # the evaluation before training included)
            for name in (METRICS_FILE, "eval.jsonl"):
                _trim_log(out / name, step0 if start_ckpt is not None else -1)
    try:
        named = cfg.problems.path in BENCHMARKS
        fields = (
            {}
            if named
            else {
                "problem_field": cfg.problems.problem_field,
                "answer_field": cfg.problems.answer_field,
                "id_field": cfg.problems.id_field,
            }
        )
        problems = select(
            load_benchmark(cfg.problems.path, **fields), offset=cfg.problems.offset, limit=cfg.problems.limit
        )
    except (OSError, ValueError) as exc:  # BenchmarkError is a ValueError: one line for the user
        raise RlRunError(f"cannot read the training problems {cfg.problems.path}: {exc}") from exc
    if not problems:
        raise RlRunError(f"{cfg.problems.path} holds no problems")
    if not cfg.problems.allow_eval_problems:
        held = [p for p in problems if split_of(p) == "eval"]
        if held:
            raise RlRunError(
                f"{len(held)} of the training problems are held out for evaluation (e.g. {held[0].benchmark}/"
                f"{held[0].id}; gsm8k rows 0-199 and the other named benchmarks are eval-only): train on gsm8k from "
                "offset 200 or your own file, or set problems.allow_eval_problems: true"
            )
    trained = _training_problems(cfg, problems)
    if cfg.eval.benchmarks:  # before anything expensive starts: the evaluation must be held out
        try:
            _, eval_problems = _eval_problems(cfg)
        except (OSError, ValueError) as exc:
            raise RlRunError(f"cannot read the evaluation problems {cfg.eval.benchmarks}: {exc}") from exc
        _check_eval_overlap(cfg, eval_problems, trained)

    learner = Learner(
        cfg.model, cfg.optim, cfg.loss, accelerator, seed=cfg.schedule.seed, temperature=cfg.trajectory.temperature
    )
    if start_ckpt is not None:
        learner.load_state(start_ckpt / "state")
        log.info("resuming from %s (step %d, problem cursor %d)", start_ckpt, step0, cursor)

    m: _Main | None = None
    if main:
        m = _Main(cfg, out)
        m.problems = _Problems(problems, cfg.schedule.seed, cursor)
        m.trained = trained
    policy0 = start_ckpt if start_ckpt is not None else out / "policy-0"
    if start_ckpt is None:
        # untied, what vLLM starts from (a tied start would reload wrongly); every process: the gather is collective
        learner.export(policy0, extra_files=_training_file(trained))
    accelerator.wait_for_everyone()
    final_dir = out / "final"
    try:
        if m is not None:
            await m.open(policy0, learner)
            if step0 == 0:
                _log_eval(out, 0, await m.evaluate(0))
        bar = _progress(cfg.schedule.steps, step0, progress and main)
        for step in range(step0 + 1, cfg.schedule.steps + 1):
            t0 = time.perf_counter()
            records: list[RolloutRecord] = []
            metrics: dict[str, Any] = {"step": step}
            if m is not None:
                records, rmetrics, groups = await m.collect(step)
                metrics.update(rmetrics)
                if cfg.schedule.log_rollouts:
                    _write_rollouts(out / "rollouts" / f"step-{step}.jsonl.gz", groups)
                group_advantages(records, cfg.loss.adv_eps)
            t1 = time.perf_counter()
            records = _broadcast(accelerator, records)
            gap_tolerance = cfg.engine.rollout_logprob_tolerance
            stats = learner.update(records, max_logprob_gap=gap_tolerance) if records else {"skipped": True}
            t2 = time.perf_counter()
            metrics["learner"] = stats
            metrics["optimizer_steps"] = learner.optimizer_steps  # since the run began (restored on resume)
            if m is not None:
                assert m.problems is not None
                metrics["problem_cursor"] = m.problems.cursor  # problems drawn since the run began
                if records:
                    # DDP: the main process holds the whole model. FSDP2 / ZeRO-3 would need save_weights'
                    # gather on every process before this (untested here: no GPUs).
                    res = await m.sync.sync(learner.save_weights, learner.probe_logprobs)
                    metrics["sync_s"] = res.seconds
                    metrics["probe_max_abs"] = res.probe.max_abs
                    metrics["probe_mean_abs"] = res.probe.mean_abs
                    metrics["probe_change"] = res.probe.change
                    metrics["probe_change_gap"] = res.probe.change_gap
                if records:
                    log.info(
                        "step %d: sampled vs learner log-prob gap on trained tokens %.2e (max %.2e, tolerance %s)",
                        step,
                        stats["logprob_gap"],
                        stats["logprob_gap_max"],
                        gap_tolerance,
                    )
                metrics["rollout_s"] = t1 - t0
                metrics["update_s"] = t2 - t1
            accelerator.wait_for_everyone()
            last = step == cfg.schedule.steps
            if step % cfg.schedule.checkpoint_every == 0 or last:
                _checkpoint(out, step, learner, accelerator, m, cfg.schedule.keep_checkpoints, trained)
            if m is not None:
                if last or (cfg.eval.every and step % cfg.eval.every == 0):
                    t3 = time.perf_counter()
                    metrics["eval"] = await m.evaluate(step)
                    metrics["eval_s"] = time.perf_counter() - t3
                    _log_eval(out, step, metrics["eval"])
                metrics["step_s"] = time.perf_counter() - t0
                _append_metrics(out, metrics)
                plot_metrics(out / METRICS_FILE, out / "metrics.png")
                bar.set_postfix(_postfix(metrics))
            bar.update(1)
        bar.close()
        if main:
            last_ckpt = _checkpoints(out)[-1]
            if final_dir.is_symlink() or final_dir.exists():
                final_dir.unlink()
            final_dir.symlink_to(last_ckpt.relative_to(out), target_is_directory=True)
    finally:
        if m is not None:
            await m.close()
    accelerator.wait_for_everyone()
    return final_dir


def _write_config(out: Path, cfg: RlConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(cfg.dump())


def _trim_log(path: Path, last_step: int) -> None:
    """Keep the JSONL lines of steps up to `last_step` (a resumed run redoes the ones after it)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def _append_metrics(out: Path, metrics: dict[str, Any]) -> None:
    with (out / METRICS_FILE).open("a") as f:
        f.write(json.dumps(metrics) + "\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
    t = metrics.get("trajectory", {})
    s = metrics.get("step_level", {})
    out = {"acc": f"{t.get('accuracy', 0):.2f}", "kept": f"{t.get('groups_kept', 0)}+{s.get('groups_kept', 0)}"}
    if t.get("tool_success") is not None:
        out["tool_ok"] = f"{t['tool_success']:.2f}"
    return out


def _write_rollouts(path: Path, groups: list[GroupResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for g in groups:
            for r in g.rollouts:
                f.write(_rollout_line(g, r) + "\n")


def _log_eval(out: Path, step: int, res: dict[str, Any] | None) -> None:
    if res is None:
        return
    with (out / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **res}) + "\n")
    for key, v in res.items():
        log.info(
            "eval step %d %s: accuracy %.3f (%.3f-%.3f), tool success %s",
            step,
            key,
            v["accuracy"],
            v["accuracy_low"],
            v["accuracy_high"],
            "n/a" if v["tool_success"] is None else f"{v['tool_success']:.3f}",
        )


def _training_problems(cfg: RlConfig, problems: list[Any]) -> Any:
    """What the RL checkpoints are trained on: the starting checkpoint's problems plus these."""
    from trainer.splits import TrainingProblems, problem_key, read_training_problems

    before = read_training_problems(cfg.model.path)
    keys = list(before.problems) if before else []
    seen = set(keys)
    keys += [k for p in problems if (k := problem_key(p.benchmark, p.id)) not in seen]
    sources = [*(before.sources if before else []), cfg.problems.path]
    return TrainingProblems(problems=keys, sources=sources)


def _training_file(trained: Any) -> dict[str, str]:
    from trainer.splits import TRAINING_PROBLEMS_FILE

    return {TRAINING_PROBLEMS_FILE: trained.model_dump_json(indent=1)}


def _checkpoint(out: Path, step: int, learner: Any, accelerator: Any, m: _Main | None, keep: int, trained: Any) -> None:
    ckpt = out / "checkpoints" / f"step-{step}"
    learner.export(ckpt, extra_files=_training_file(trained))  # replaces an older one atomically
    accelerator.wait_for_everyone()
    learner.save_state(ckpt / "state")
    accelerator.wait_for_everyone()
    if m is not None:
        assert m.problems is not None
        (ckpt / LOOP_STATE).write_text(json.dumps({"step": step, "cursor": m.problems.cursor}))
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def run(cfg: RlConfig, *, resume: bool = False, progress: bool = True) -> Path:
    return asyncio.run(run_rl(cfg, resume=resume, progress=progress))
