"""A tiny Qwen2 trained to write THOR-style tool-integrated trajectories, for fast tests.

Owns: a small fixed problem set (`TIR_PROBLEMS`: prompt, the full expected assistant
text with its injected ```output blocks, the expected answer) and building a model
that has memorised it: the architecture of :mod:`tests.support.tiny_model`
(`TINY_SPEC`: hidden 64, 2 layers, head_dim 32, tied embeddings, the real Qwen
tokenizer and chat template) trained with plain PyTorch on CPU (seeded, one thread,
1000 full-batch steps: under a minute here). Each trajectory is tokenised exactly as the decoder builds it: the
prompt by :func:`thor_engine.prompting.render_chat` (system prompt
`TIR_INSTRUCTIONS`), each model segment on its own, each observation as the
decoder's injection ``"```output\\n{obs}\\n```\\n"`` after the model's ``"```\\n"``.
The loss covers the model's tokens only (observations are inputs). So greedy decoding
in vLLM stops at each closing fence exactly where the decoder expects, and after the
real sandbox output continues with the memorised text: real tool rounds on real vLLM
at a few hundred tokens per second.

Training touches only the embedding rows of tokens that occur in the problem set plus
one shared row for all other tokens (trained as one class carrying their total mass,
so the loss is the exact full-vocabulary cross-entropy); every untrained token gets
that shared row. Targets are pushed above every competitor, the untrained mass
included, by a logit margin, so the memorised text survives bf16 and sampling at
moderate temperatures (the self-correction retries sample). The build verifies the
exported full-vocabulary checkpoint (bf16 weights, fp32 and bf16 compute) reproduces
every memorised token by greedy argmax before it is published. Builds are deterministic (seeded, fixed thread count,
deterministic algorithms: same bytes on the same machine kind and torch version),
idempotent (a marker with a fingerprint of everything that goes in) and atomic (a
temporary directory renamed into place).

Does not own: the random tiny model (tiny_model.py), real models (thor_engine/models/provision.py)
or the decoder. This is a test fixture, not a model for serving users: it knows
nothing beyond its few memorised problems and writes nonsense for any other prompt.

CLI::

    python -m tests.support.tiny_tir_model OUT --tokenizer models/Qwen2.5-Coder-0.5B-Instruct
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.support.tiny_model import TINY_SPEC, build_lock, copy_tokenizer, hash_tokenizer_source, is_complete
from thor_engine.models.provision import publish_dir

__all__ = ["DEFAULT_STEPS", "TIR_PROBLEMS", "TirProblem", "build_tiny_tir_model", "training_sequences"]

MARKER = ".thor-tiny-tir.json"
FORMAT_VERSION = 1
DEFAULT_STEPS = 1000
#: Logit margin the trained target must keep over every other token and over the log of
#: the total mass of the untrained tokens.
MARGIN = 6.0
LR = 3e-3
INIT_RANGE = 0.02
#: torch threads used for training: one, so the floating-point reduction order (and the
#: bytes of the checkpoint) do not depend on how many cores the building machine has.
TRAIN_THREADS = 1

_OBS_BLOCK = re.compile(r"```output\n(.*?)\n```\n", re.DOTALL)


@dataclass(frozen=True)
class TirProblem:
    """One memorised problem: what the user asks and the exact trajectory the model writes."""

    name: str
    kind: Literal["single", "two_call", "self_correct", "long"]
    prompt: str  # the user message (rendered with the TIR system prompt by render_chat)
    completion: str  # the whole assistant text, injected output blocks included
    answer: str  # the content of the final \boxed{}

    def segments(self) -> list[tuple[Literal["model", "observation"], str]]:
        """The completion split into model text and injected output blocks, in order."""
        out: list[tuple[Literal["model", "observation"], str]] = []
        pos = 0
        for m in _OBS_BLOCK.finditer(self.completion):
            out.append(("model", self.completion[pos : m.start()]))
            out.append(("observation", m.group(0)))
            pos = m.end()
        out.append(("model", self.completion[pos:]))
        return out

    @property
    def observations(self) -> list[str]:
        """The observation texts, as the decoder's judge() produces them from the sandbox."""
        return _OBS_BLOCK.findall(self.completion)

    @property
    def code_blocks(self) -> list[str]:
        """The code of each ```python block (as the decoder extracts it: with its final newline)."""
        return re.findall(r"```python\n(.*?\n)```\n", self.completion, re.DOTALL)

    @property
    def first_round(self) -> str:
        """The text of the first engine request: up to and including the first closing fence."""
        return self.segments()[0][1]

    @property
    def rounds(self) -> int:
        return len(self.observations)


def _p(name: str, kind: Any, prompt: str, completion: str, answer: str) -> TirProblem:
    return TirProblem(name, kind, prompt, completion, answer)


#: The memorised problem set (greedy decoding reproduces each completion exactly).
TIR_PROBLEMS: tuple[TirProblem, ...] = (
    _p(
        "mul",
        "single",
        "Compute 17*23.",
        "I will compute this with Python.\n```python\nprint(17*23)\n```\n```output\n391\n```\n"
        "The result is 391, so the answer is \\boxed{391}.",
        "391",
    ),
    _p(
        "sum100",
        "single",
        "What is the sum of the integers from 1 to 100?",
        "Let me add them up in Python.\n```python\nprint(sum(range(1, 101)))\n```\n```output\n5050\n```\n"
        "The sum is 5050. The answer is \\boxed{5050}.",
        "5050",
    ),
    _p(
        "books",
        "single",
        "How many ways are there to choose 3 books from 10?",
        "This is a binomial coefficient, which I evaluate directly.\n```python\nfrom math import comb\n"
        "print(comb(10, 3))\n```\n```output\n120\n```\nThere are 120 ways, so \\boxed{120}.",
        "120",
    ),
    _p(
        "pow2",
        "single",
        "Compute 2^20.",
        "Powers of two grow fast, so I check with code.\n```python\nprint(2**20)\n```\n```output\n1048576\n```\n"
        "Hence 2^20 = \\boxed{1048576}.",
        "1048576",
    ),
    _p(
        "modpow",
        "two_call",
        "Find the remainder when 7^100 is divided by 13, then add 5.",
        "First I need the modular power, which Python computes quickly.\n```python\nprint(pow(7, 100, 13))\n```\n"
        "```output\n9\n```\nThe remainder is 9. Next I add 5 to it.\n```python\nprint(9 + 5)\n```\n"
        "```output\n14\n```\nSo the final value is \\boxed{14}.",
        "14",
    ),
    _p(
        "gcd",
        "two_call",
        "What is the greatest common divisor of 84 and 126, and what is its square?",
        "I start with the gcd.\n```python\nimport math\nprint(math.gcd(84, 126))\n```\n```output\n42\n```\n"
        "The gcd is 42. Squaring it gives the second part.\n```python\nprint(42**2)\n```\n```output\n1764\n```\n"
        "The gcd is 42 and its square is \\boxed{1764}.",
        "1764",
    ),
    _p(
        "divzero",
        "self_correct",
        "Divide 10 by zero safely.",
        "I will try the division directly.\n```python\nprint(10/0)\n```\n"
        "```output\nZeroDivisionError: division by zero\n```\n"
        "Division by zero is undefined, so I guard against it.\n```python\nd = 0\n"
        "print(10 / d if d != 0 else 'undefined')\n```\n```output\nundefined\n```\n"
        "The quotient is undefined, so the answer is \\boxed{\\text{undefined}}.",
        "\\text{undefined}",
    ),
    _p(
        "divisors360",
        "long",
        "Let S be the sum of all positive divisors of 360. How many divisors does 360 have, what is S, "
        "and what is S modulo 7?",
        "Let me plan before computing. The prime factorisation of 360 is needed first, because both the count "
        "and the sum of divisors follow from it. I will factor it with a small trial-division loop instead of "
        "relying on a library.\n```python\nn = 360\nfactors = {}\nm = n\np = 2\nwhile m > 1:\n"
        "    while m % p == 0:\n        factors[p] = factors.get(p, 0) + 1\n        m //= p\n    p += 1\n"
        "print(factors)\n```\n```output\n{2: 3, 3: 2, 5: 1}\n```\n"
        "So 360 = 2^3 * 3^2 * 5. The number of divisors is the product of the exponents plus one, that is "
        "(3+1)(2+1)(1+1) = 24. To be safe, I will count the divisors directly and also add them up.\n"
        "```python\ndivisors = [d for d in range(1, 361) if 360 % d == 0]\nprint(len(divisors), sum(divisors))\n"
        "```\n```output\n24 1170\n```\n"
        "Both checks agree: there are 24 divisors and their sum is S = 1170. The formula gives the same value, "
        "since (1+2+4+8)(1+3+9)(1+5) = 15 * 13 * 6 = 1170. Finally, the question asks for S modulo 7.\n"
        "```python\nprint(1170 % 7)\n```\n```output\n1\n```\n"
        "The remainder is 1, because 7 * 167 = 1169. Therefore 360 has 24 divisors, S = 1170, and S mod 7 is "
        "\\boxed{1}.",
        "1",
    ),
)


@dataclass(frozen=True)
class TrainingSequence:
    problem: TirProblem
    token_ids: list[int]
    loss_mask: list[int]  # 1 where token_ids[i] is a model token (predicted from i-1)
    prompt_len: int


def training_sequences(tokenizer: Any, problems: tuple[TirProblem, ...] = TIR_PROBLEMS) -> list[TrainingSequence]:
    """Token ids of each full trajectory, built segment by segment as the decoder builds them."""
    from thor_engine.observation import injection
    from thor_engine.prompting import render_chat

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    out = []
    for p in problems:
        ids = render_chat(tokenizer, [{"role": "user", "content": p.prompt}])
        prompt_len = len(ids)
        mask = [0] * prompt_len
        model_text = ""
        for kind, text in p.segments():
            if kind == "observation":
                obs = _OBS_BLOCK.fullmatch(text).group(1)  # type: ignore[union-attr]
                text = injection(obs, model_text.endswith("\n"))
                seg = tokenizer.encode(text, add_special_tokens=False)
                mask += [0] * len(seg)
            else:
                seg = tokenizer.encode(text, add_special_tokens=False)
                mask += [1] * len(seg)
            model_text += text
            ids += seg
        ids.append(eos)
        mask.append(1)
        out.append(TrainingSequence(p, ids, mask, prompt_len))
    return out


def text_sequences(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[TrainingSequence]:
    """Plain text continuations to memorise: ``(prompt text, completion text)``, the prompt tokenised as
    a `/v1/completions` endpoint tokenises it (one string, no special tokens added), the completion on its
    own and ended by the end-of-turn token (so generation stops there)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i, (prompt, completion) in enumerate(pairs):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        done = [*tokenizer.encode(completion, add_special_tokens=False), eos]
        problem = TirProblem(f"text-{i}", "single", prompt, completion, "")
        out.append(TrainingSequence(problem, ids + done, [0] * len(ids) + [1] * len(done), len(ids)))
    return out


def _fingerprint(tokenizer_source: Path, steps: int, seed: int, extra: Sequence[tuple[str, str]] = ()) -> str:
    import torch

    h = hashlib.sha256(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "spec": TINY_SPEC,
                "steps": steps,
                "seed": seed,
                "margin": MARGIN,
                "lr": LR,
                "init": INIT_RANGE,
                "threads": TRAIN_THREADS,
                "torch": torch.__version__,
                "problems": [p.__dict__ for p in TIR_PROBLEMS],
                **({"extra": [list(e) for e in extra]} if extra else {}),
            },
            sort_keys=True,
        ).encode()
    )
    # the training code itself: a change to it is a different model
    h.update(Path(__file__).read_bytes())
    hash_tokenizer_source(h, tokenizer_source)
    return h.hexdigest()


def _qwen2_config(vocab: int, src_cfg: dict, tok: Any, **over: Any) -> Any:
    from transformers import Qwen2Config

    spec: dict[str, Any] = dict(TINY_SPEC)
    spec.pop("seed")
    spec.update(
        vocab_size=vocab,
        bos_token_id=src_cfg.get("bos_token_id", tok.bos_token_id),
        eos_token_id=src_cfg.get("eos_token_id", tok.eos_token_id),
        pad_token_id=src_cfg.get("pad_token_id", tok.pad_token_id),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        use_sliding_window=False,
        architectures=["Qwen2ForCausalLM"],
    )
    spec.update(over)
    return Qwen2Config(**spec)


def _length_groups(seqs: list[TrainingSequence]) -> list[list[TrainingSequence]]:
    """Sequences grouped so that padding stays small (a new group below 60% of its longest)."""
    groups: list[list[TrainingSequence]] = []
    for s in sorted(seqs, key=lambda s: -len(s.token_ids)):
        if groups and len(s.token_ids) >= 0.6 * len(groups[-1][0].token_ids):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _train(
    seqs: list[TrainingSequence], src_cfg: dict, tok: Any, vocab: int, steps: int, seed: int, log: Any
) -> tuple[Any, list[int]]:
    """Train on the used vocabulary subset; return the full-vocabulary model (fp32) and the subset."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2ForCausalLM

    used = sorted({t for s in seqs for t in s.token_ids})
    remap = {t: i for i, t in enumerate(used)}
    # micro-batches of similar length (the long trajectory alone), one optimiser step over all
    batches = []
    for group in _length_groups(seqs):
        length = max(len(s.token_ids) for s in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        tgt_mask = torch.zeros(len(group), length, dtype=torch.bool)
        for i, s in enumerate(group):
            ids[i, : len(s.token_ids)] = torch.tensor([remap[t] for t in s.token_ids])
            tgt_mask[i, : len(s.token_ids)] = torch.tensor(s.loss_mask, dtype=torch.bool)
        mask = tgt_mask[:, 1:]
        batches.append((ids[:, :-1], ids[:, 1:][mask], mask))
    total = sum(len(b[1]) for b in batches)

    torch.manual_seed(seed)
    # one extra row, REST, is the output vector shared by every untrained token: its class
    # stands for all of them at once (logit + ln(count)), so the loss is the exact
    # full-vocabulary cross-entropy and sampling at temperature 1 stays on the memorised text
    rest_row, rest_bias = len(used), math.log(vocab - len(used))
    cfg = _qwen2_config(
        len(used) + 1,
        src_cfg,
        tok,
        initializer_range=INIT_RANGE,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) * max(0.05, 1 - k / steps))
    bias = torch.zeros(len(used) + 1)
    bias[rest_row] = rest_bias
    t0 = time.monotonic()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "right": 0, "worst": float("inf")}
        for inputs, tgt, mask in batches:
            h = model.model(input_ids=inputs).last_hidden_state[mask]  # (T, H) at model positions
            logits = h @ model.model.embed_tokens.weight.T  # tied output layer, subset rows only
            logits = logits + bias  # the REST class: every untrained token together
            ce = F.cross_entropy(logits, tgt, reduction="sum")
            t_logit = logits.gather(1, tgt[:, None])[:, 0]
            other = logits.scatter(1, tgt[:, None], float("-inf")).max(1).values
            hinge = F.relu(MARGIN - (t_logit - other)).sum()
            loss = (ce + hinge) / total
            loss.backward()
            with torch.no_grad():
                stats["loss"] += loss.item()
                stats["right"] += int((logits.argmax(1) == tgt).sum())
                stats["worst"] = min(stats["worst"], float((t_logit - other).min()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(
                f"step {step:4d}  loss {stats['loss']:.4f}  acc {stats['right'] / total:.4f}  "
                f"min margin {stats['worst']:+.2f}  {time.monotonic() - t0:.0f}s"
            )

    # the full-vocabulary model: trained rows in place, every other row the REST vector
    full_cfg = _qwen2_config(vocab, src_cfg, tok)
    full = Qwen2ForCausalLM(full_cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = state["model.embed_tokens.weight"]
    emb = trained[rest_row].repeat(vocab, 1)
    emb[torch.tensor(used)] = trained[:rest_row]
    state["model.embed_tokens.weight"] = emb
    state["lm_head.weight"] = emb
    missing, unexpected = full.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    full.tie_weights()
    full.eval()
    return full, used


def verify_memorised(model: Any, seqs: list[TrainingSequence]) -> tuple[int, float, float]:
    """Teacher-forced check over the full vocabulary of every model token.

    Returns (tokens greedy gets wrong, smallest logit margin, largest probability of
    sampling anything but the memorised token at temperature 1)."""
    import torch

    wrong, worst, dev = 0, float("inf"), 0.0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.token_ids])
            logits = model(ids).logits[0, :-1].float()
            tgt = ids[0, 1:]
            m = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
            lg, tg = logits[m], tgt[m]
            wrong += int((lg.argmax(1) != tg).sum())
            t = lg.gather(1, tg[:, None])[:, 0]
            other = lg.scatter(1, tg[:, None], float("-inf")).max(1).values
            worst = min(worst, float((t - other).min()))
            dev = max(dev, float(1 - torch.softmax(lg, 1).gather(1, tg[:, None]).min()))
    return wrong, worst, dev


def build_tiny_tir_model(
    out_dir: Path,
    tokenizer_source: Path,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    force: bool = False,
    verify: bool = True,
    log: Any = None,
    extra: Sequence[tuple[str, str]] = (),
) -> Path:
    """Train and write the tiny TIR model into *out_dir* (reused when already built identically).

    *tokenizer_source* is a Hugging Face model directory with the Qwen tokenizer and chat
    template (e.g. models/Qwen2.5-Coder-0.5B-Instruct). Raises RuntimeError when the
    trained model does not reproduce every memorised trajectory; ``verify=False`` skips
    that check (only for testing the build itself with a handful of steps). *log*
    receives progress lines. *extra*: further ``(prompt text, completion text)`` pairs to
    memorise as plain completions (`text_sequences`), e.g. a TIRGen actor's and critic's turns.
    """
    log = log or (lambda msg: None)
    out_dir, tokenizer_source = Path(out_dir), Path(tokenizer_source)
    if (
        not (tokenizer_source / "tokenizer.json").is_file()
        and not (tokenizer_source / "tokenizer_config.json").is_file()
    ):
        raise FileNotFoundError(f"{tokenizer_source} holds no tokenizer files")
    fp = _fingerprint(tokenizer_source, steps, seed, extra) + ("" if verify else "-unverified")
    with build_lock(out_dir):
        if not force and is_complete(out_dir, MARKER, fp):
            return out_dir
        return _build(out_dir, tokenizer_source, fp, steps, seed, verify, log, extra)


def _build(
    out_dir: Path,
    tokenizer_source: Path,
    fp: str,
    steps: int,
    seed: int,
    verify: bool,
    log: Any,
    extra: Sequence[tuple[str, str]],
) -> Path:

    import torch
    from transformers import AutoTokenizer

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(tokenizer_source)
    src_cfg: dict = {}
    if (tokenizer_source / "config.json").is_file():
        src_cfg = json.loads((tokenizer_source / "config.json").read_text())
    vocab = max(int(src_cfg.get("vocab_size") or len(tok)), len(tok))
    seqs = training_sequences(tok) + text_sequences(tok, extra)

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        model, used = _train(seqs, src_cfg, tok, vocab, steps, seed, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    train_s = time.monotonic() - t0

    model = model.to(torch.bfloat16)  # what is saved
    wrong_bf16, margin_bf16, dev_bf16 = verify_memorised(model, seqs)
    wrong_fp32, margin_fp32, dev_fp32 = verify_memorised(model.float(), seqs)
    model = model.to(torch.bfloat16)
    log(
        f"verify: bf16 {wrong_bf16} wrong (min margin {margin_bf16:+.2f}, max p(other) at T=1 {dev_bf16:.2e}), "
        f"fp32 {wrong_fp32} wrong (min margin {margin_fp32:+.2f}, max p(other) {dev_fp32:.2e})"
    )
    if verify and (wrong_bf16 or wrong_fp32):
        raise RuntimeError(
            f"the tiny TIR model did not memorise its trajectories after {steps} steps "
            f"({wrong_bf16} bf16 / {wrong_fp32} fp32 tokens wrong): raise steps"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.config.dtype = torch.bfloat16
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(tokenizer_source, tok, tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "fingerprint": fp,
                    "tokenizer_source": str(tokenizer_source),
                    "spec": TINY_SPEC,
                    "training": {
                        "steps": steps,
                        "seed": seed,
                        "lr": LR,
                        "initializer_range": INIT_RANGE,
                        "margin": MARGIN,
                        "threads": TRAIN_THREADS,
                    },
                    "torch": torch.__version__,
                    "trained_vocab_rows": len(used),
                    "problems": [p.name for p in TIR_PROBLEMS],
                    "train_seconds": round(train_s, 1),
                    "min_margin": {"bf16": round(margin_bf16, 3), "fp32": round(margin_fp32, 3)},
                    "wrong_tokens": {"bf16": wrong_bf16, "fp32": wrong_fp32},
                    "max_p_other_at_t1": {"bf16": float(f"{dev_bf16:.3g}"), "fp32": float(f"{dev_fp32:.3g}")},
                },
                indent=2,
            )
            + "\n"
        )
        publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.tiny_tir_model",
        description="Train a tiny Qwen2 that writes memorised THOR trajectories (tests).",
    )
    ap.add_argument("out", type=Path, help="output model directory")
    ap.add_argument(
        "--tokenizer", type=Path, required=True, help="model directory whose tokenizer and chat template to reuse"
    )
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if already built")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        path = build_tiny_tir_model(
            args.out,
            args.tokenizer,
            steps=args.steps,
            seed=args.seed,
            force=args.force,
            log=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)),
        )
    except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
