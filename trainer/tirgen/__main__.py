"""`python -m trainer.tirgen`: build tool-integrated SFT data with an actor and a critic.

Example (the default model as actor and critic, through a THOR server started with
`make serve`; training problems of GSM8K, which never overlap its held-out rows)::

    python -m trainer.tirgen --actor-url http://127.0.0.1:8000 --benchmark gsm8k --limit 100 \\
        --out runs/tirgen/gsm8k-default

Re-filter a finished run (today's filter stages, the run's recorded thresholds; its log is
never regenerated, no sample is edited), e.g. the shipped run::

    python -m trainer.tirgen --refilter docs/training/tirgen-gsm8k-default

Owns: argument parsing, opening the two endpoints and the sandbox, choosing the problems
(with the split check), and the exit codes (0 done, 1 an endpoint or the sandbox failed,
2 bad arguments or data).

Does not own: generation (generate.py), the run directory (runner.py), filters.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .filters import ALL_STAGES, FilterConfig
from .generate import TirGenConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.tirgen", description=__doc__.split("\n\n")[0])
    m = p.add_argument_group("models (any OpenAI-compatible endpoint; the critic's must return token ids)")
    m.add_argument("--actor-url", help="the actor's server, e.g. http://127.0.0.1:8000 (required to generate)")
    m.add_argument("--actor-model", default=None, help="served model name (default: the first it serves)")
    m.add_argument(
        "--actor-tokenizer",
        default=None,
        help="the actor's tokenizer for its chat template: a directory or preset (default: the served model's "
        "directory, when the endpoint reports one that exists here)",
    )
    m.add_argument("--critic-url", default=None, help="the critic's server (default: --actor-url)")
    m.add_argument("--critic-model", default=None, help="default: --actor-model when the URLs are the same")
    m.add_argument("--critic-tokenizer", default=None, help="default: as for the actor")
    m.add_argument(
        "--tokenizer",
        default=None,
        help="the policy's tokenizer: it renders the training prompt and counts tokens (default: the actor's)",
    )
    m.add_argument("--api-key", default=None, help="Bearer key for the actor (and the critic, unless --critic-api-key)")
    m.add_argument("--critic-api-key", default=None)
    b = p.add_argument_group("problems (training split only, unless told)")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--benchmark", help="a named benchmark (its training split is used)")
    src.add_argument("--problems", type=Path, help="a JSONL / dataset of problems with gold answers")
    b.add_argument("--problem-field", default=None)
    b.add_argument("--answer-field", default=None)
    b.add_argument("--id-field", default=None)
    b.add_argument(
        "--allow-eval-problems",
        action="store_true",
        help="also generate from held-out evaluation problems (then never evaluate a model trained on them there)",
    )
    b.add_argument("--offset", type=int, default=0)
    b.add_argument("--limit", type=int, default=None)
    g = p.add_argument_group("generation")
    defaults = TirGenConfig()
    for name, fld in TirGenConfig.model_fields.items():
        g.add_argument(
            "--" + name.replace("_", "-"),
            type=type(getattr(defaults, name)),
            default=getattr(defaults, name),
            help=f"{fld.description or ''} (default {getattr(defaults, name)})",
        )
    g.add_argument("--samples-per-problem", type=int, default=1, help="attempts per problem; dedup keeps one")
    g.add_argument("--concurrency", type=int, default=8, help="problems in flight at once (default 8)")
    g.add_argument("--seed", type=int, default=0)
    f = p.add_argument_group("filters")
    f.add_argument(
        "--disable-filter", action="append", default=[], choices=ALL_STAGES, help="turn a stage off (repeatable)"
    )
    f.add_argument(
        "--low-quality-max-lines",
        type=int,
        default=None,
        help="a block with this many real lines or fewer is low quality (default 5)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="run directory (required, except with --refilter)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out")
    o.add_argument(
        "--report-only",
        action="store_true",
        help="refilter the logged attempts of --out with these filter flags and rewrite the reports",
    )
    o.add_argument(
        "--refilter",
        type=Path,
        metavar="RUN_DIR",
        help="re-run today's filters over a finished run (its run.json thresholds and disabled stages; a gzipped "
        "log, as shipped, is written back gzipped) and rewrite its samples, rejections, summary and funnel; "
        "--tokenizer also checks token lengths",
    )
    o.add_argument("--no-progress", action="store_true")
    p.add_argument("--sandbox-url", default=None, help="a running sandbox service (default: start a local pool)")
    p.add_argument("--sandbox-pool", type=int, default=4)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.refilter is None:
        missing = [
            name
            for name, given in (
                ("--actor-url", args.actor_url or args.report_only),
                ("--benchmark or --problems", args.benchmark or args.problems or args.report_only),
                ("--out", args.out),
            )
            if not given
        ]
        if missing:
            p.error(f"the following arguments are required: {', '.join(missing)} (or --refilter RUN_DIR)")
    return args


def _filter_config(args: argparse.Namespace, tokenizer: object | None) -> FilterConfig:
    over: dict[str, object] = {"disabled": frozenset(args.disable_filter), "seed": args.seed}
    if args.low_quality_max_lines is not None:
        over["low_quality_max_lines"] = args.low_quality_max_lines
    cfg = FilterConfig(**over)
    return cfg.with_tokenizer(tokenizer) if tokenizer is not None else cfg


async def _run(args: argparse.Namespace) -> int:
    from trainer.evaluate.benchmarks import BENCHMARKS, load_benchmark, select
    from trainer.evaluate.client_loop import resolve_tokenizer
    from trainer.evaluate.remote_backend import load_tokenizer
    from trainer.splits import split_problems

    from .endpoints import Actor, Critic
    from .runner import run_tirgen, write_reports

    if args.refilter is not None:
        from .runner import refilter_run

        tok = load_tokenizer(resolve_tokenizer(args.tokenizer))[0] if args.tokenizer else None
        result = refilter_run(args.refilter, tok)
        s = result.filters
        print(f"{args.refilter}: {len(s.kept)} kept of {s.generated} generated; rejected by stage {s.by_stage}")
        return 0
    if args.report_only:
        result = write_reports(args.out, _filter_config(args, None))
        print(f"{args.out}: {len(result.kept)} kept of {result.attempted} attempted")
        return 0
    source = args.benchmark or str(args.problems)
    problems = load_benchmark(
        source, problem_field=args.problem_field, answer_field=args.answer_field, id_field=args.id_field
    )
    if not args.allow_eval_problems:
        train = split_problems(problems, "train")
        if not train:
            raise ValueError(
                f"{source} has no training problems: it is held out for evaluation ({', '.join(BENCHMARKS)} are "
                "eval-only except gsm8k rows 200-499); pass --allow-eval-problems to use it anyway"
            )
        problems = train
    problems = select(problems, offset=args.offset, limit=args.limit)
    config = TirGenConfig(**{k: getattr(args, k) for k in TirGenConfig.model_fields})
    critic_url = args.critic_url or args.actor_url
    critic_model = args.critic_model or (args.actor_model if critic_url == args.actor_url else None)
    async with (
        Actor.open(
            args.actor_url, model=args.actor_model, tokenizer=args.actor_tokenizer, api_key=args.api_key
        ) as actor,
        Critic.open(
            critic_url,
            model=critic_model,
            tokenizer=args.critic_tokenizer or args.actor_tokenizer,
            api_key=args.critic_api_key or args.api_key,
            sandbox_url=args.sandbox_url,
            sandbox_pool=args.sandbox_pool,
        ) as critic,
    ):
        policy = load_tokenizer(resolve_tokenizer(args.tokenizer))[0] if args.tokenizer else actor.tokenizer
        result = await run_tirgen(
            problems,
            actor,
            critic,
            policy,
            args.out,
            config=config,
            filters=_filter_config(args, policy),
            samples_per_problem=args.samples_per_problem,
            concurrency=args.concurrency,
            seed=args.seed,
            resume=args.resume,
            progress=not args.no_progress,
            settings={"source": source, "actor_url": args.actor_url, "critic_url": critic_url},
        )
    s = result.filters
    print(
        f"{args.out}: attempted {result.attempted}, dropped before filters {dict(result.dropped)}, "
        f"generated {s.generated}, kept {len(s.kept)}; code-invocation ratio {s.code_invocation_generated:.1%} "
        f"generated -> {s.code_invocation_kept:.1%} kept ({result.wall_s:.0f} s). Funnel: {args.out / 'funnel.md'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("httpx", "vllm", "thor_sandbox"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from trainer.evaluate.benchmarks import BenchmarkError
    from trainer.evaluate.targets import TargetError

    from .runner import RunSettingsError

    try:
        return asyncio.run(_run(args))
    except (BenchmarkError, RunSettingsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
