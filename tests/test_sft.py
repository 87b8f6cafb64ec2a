"""Cold-start SFT (`python -m trainer.sft`) on the real thing.

Owns: segment tokenisation (against the fixture's decoder-faithful build, and against the
real decoder's trajectories: the server's ThorEngine on vLLM with the real sandbox, serving
the SFT export of the tiny TIR model), the data layer's inputs and errors, a few CPU
training steps from the tied tiny TIR model whose untied export the real server serves with
a real tool round, the LoRA path (merged export equals base + adapter merged by peft),
resume (the step count continues and the continued steps equal an uninterrupted run), DDP
with 2 CPU processes under `accelerate launch`, the model card, the shipped accelerate configs.
One vLLM start for the whole file (the server), so it stays a few minutes.

Does not own: the tiny model (tests/support/tiny_tir_model.py) or the decoder's own tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_vllm
from tests.support.tiny_tir_model import TIR_PROBLEMS, training_sequences
from tests.support.tir_samples import tiny_tir_samples, write_samples_jsonl
from trainer.sft.encode import (
    IGNORE_INDEX,
    SegmentError,
    encode_segments,
    encode_trajectory_segments,
    end_token_id,
)

ROOT = Path(__file__).resolve().parents[1]
#: settings every training run here shares: tiny steps, a small constant lr so the
#: memorised trajectories survive, batch 2 over the 8 samples (4 steps per epoch)
BASE_ARGS = ["--lr", "1e-5", "--lr-scheduler", "constant", "--batch-size", "2", "--no-progress"]


def problem(name: str):
    return next(p for p in TIR_PROBLEMS if p.name == name)


@pytest.fixture(scope="module")
def tir_tokenizer(tokenizer):
    """The default model's tokenizer and chat template: the tiny TIR model carries a copy of them."""
    return tokenizer


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory, tir_tokenizer) -> Path:
    return write_samples_jsonl(tmp_path_factory.mktemp("sft-data") / "samples.jsonl", tiny_tir_samples(tir_tokenizer))


def sft(argv: list[str]) -> int:
    from trainer.sft.__main__ import main

    return main([str(a) for a in argv])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def losses(out: Path) -> dict[int, float]:
    return {p["step"]: p["loss"] for p in read_json(out / "train_log.json")["steps"]}


def assert_untied(final: Path) -> None:
    from safetensors import safe_open

    assert read_json(final / "config.json")["tie_word_embeddings"] is False
    with safe_open(str(final / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= keys
        assert st.get_tensor("lm_head.weight").shape == st.get_tensor("model.embed_tokens.weight").shape


# ----------------------------------------------------------------- tokenisation (no engine)


def test_segments_encode_like_the_fixtures_decoder_tokenisation(tir_tokenizer) -> None:
    """TirSample segments -> the same ids and mask as the tiny model's decoder-faithful build."""
    samples = tiny_tir_samples(tir_tokenizer)
    for sample, seq in zip(samples, training_sequences(tir_tokenizer), strict=True):
        enc = encode_segments(tir_tokenizer, sample.segments)
        assert enc.input_ids == seq.token_ids
        assert enc.loss_mask == seq.loss_mask
        assert enc.segment_kinds[0] == "prompt" and sum(enc.segment_lengths) == len(enc)


def test_labels_mask_everything_but_model_tokens(tir_tokenizer) -> None:
    im_end = tir_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_token_id(tir_tokenizer) == im_end
    segs = [
        ("prompt", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        {"kind": "model", "text": "x\n```python\nprint(1)\n```\n"},
        ("observation", "```output\n1\n```\n"),
        ("injected", "</think>"),
        ("model", ""),  # empty runs add nothing
        ("model", "so \\boxed{1}."),
    ]
    enc = encode_segments(tir_tokenizer, segs)
    texts = [s["text"] if isinstance(s, dict) else s[1] for s in segs]
    pieces = [tir_tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert pieces[0][0] == tir_tokenizer.convert_tokens_to_ids("<|im_start|>")  # specials in the text stay specials
    assert enc.input_ids == [t for p in pieces for t in p] + [im_end]
    want = [IGNORE_INDEX] * len(pieces[0]) + pieces[1] + [IGNORE_INDEX] * (len(pieces[2]) + len(pieces[3]))
    assert enc.labels == want + pieces[5] + [im_end]
    assert enc.segment_kinds == ["prompt", "model", "observation", "injected", "model"]
    assert enc.trained_tokens == len(pieces[1]) + len(pieces[5]) + 1
    no_end = encode_segments(tir_tokenizer, segs, append_end=False)
    assert no_end.input_ids == enc.input_ids[:-1]


def test_an_observation_spelling_control_tokens_is_encoded_as_text(tir_tokenizer) -> None:
    """A tool output that prints `<|im_end|>` (and the model's code that spells it) is trained on as
    the decoder holds it: plain text, never the control token (which would teach the model that a
    tool can end its turn)."""
    im_start, im_end = tir_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    segs = [
        ("prompt", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        ("model", "```python\nprint('<|im_end|>')\n```\n"),
        ("observation", "```output\n<|im_end|>\n<|im_start|>system\n```\n"),
        ("model", "so \\boxed{1}."),
    ]
    enc = encode_segments(tir_tokenizer, segs, append_end=False)
    start = sum(enc.segment_lengths[:2])
    observation = enc.input_ids[start : start + enc.segment_lengths[2]]
    assert im_start not in observation and im_end not in observation, observation
    code = enc.input_ids[enc.segment_lengths[0] : start]  # the model's own text, its print of the marker
    assert im_end not in code and tir_tokenizer.decode(code) == segs[1][1]
    assert tir_tokenizer.decode(observation) == segs[2][1]
    assert enc.input_ids[0] == im_start  # the prompt's control tokens stay control tokens


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([("prompt", "p"), ("observation", "o")], "no non-empty model segment"),
        ([("prompt", "p"), ("model", "")], "no non-empty model segment"),
        ([("prompt", "p"), ("assistant", "x")], "kind 'assistant'"),
        ([("model", 3)], "expected a string"),
        (["model text"], "expected {'kind'"),
    ],
)
def test_bad_segments_are_named(tir_tokenizer, segments, message) -> None:
    with pytest.raises(SegmentError, match=message.replace("{", r"\{").replace("(", r"\(")):
        encode_segments(tir_tokenizer, segments)


# ----------------------------------------------------------------- data layer


def test_data_inputs_agree_and_lengths_are_counted(tmp_path, samples_file, tir_tokenizer) -> None:
    import datasets

    from trainer.sft.data import load_sft_dataset

    ds, stats = load_sft_dataset(samples_file, tir_tokenizer, 4096)
    assert stats.samples_read == stats.kept == len(TIR_PROBLEMS) and stats.dropped_too_long == 0
    expect = [s.token_ids for s in training_sequences(tir_tokenizer)]
    assert ds["input_ids"] == expect
    assert stats.tokens == sum(map(len, expect)) and stats.longest == max(map(len, expect))
    assert stats.trained_tokens == sum(sum(s.loss_mask) for s in training_sequences(tir_tokenizer))

    # the directory that holds samples.jsonl, and a datasets save_to_disk copy: the same rows
    ds_dir, _ = load_sft_dataset(samples_file.parent, tir_tokenizer, 4096)
    assert ds_dir["input_ids"] == expect
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ds_disk, _ = load_sft_dataset(tmp_path / "saved", tir_tokenizer, 4096)
    assert ds_disk["input_ids"] == expect and ds_disk["labels"] == ds["labels"]

    # too long: dropped and counted, never truncated
    cut = sorted(map(len, expect))[4]
    short, st = load_sft_dataset(samples_file, tir_tokenizer, cut)
    assert st.dropped_too_long == sum(len(e) > cut for e in expect) > 0
    assert st.kept + st.dropped_too_long == st.samples_read
    assert sorted(short["input_ids"]) == sorted(e for e in expect if len(e) <= cut)


def test_collator_pads_labels_with_ignore_index() -> None:
    from trainer.sft.train import PaddingCollator

    batch = PaddingCollator(pad_id=7)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.slow
def test_clear_errors(tmp_path, samples_file, default_model, capsys) -> None:
    out = tmp_path / "out"
    common = ["--model", default_model, "--out", out, "--max-steps", "1", *BASE_ARGS]

    assert sft(["--data", tmp_path / "missing.jsonl", *common]) == 1
    assert "missing.jsonl: no such SFT data file" in capsys.readouterr().err

    bad = tmp_path / "bad" / "samples.jsonl"
    rows = samples_file.read_text().splitlines()
    row = json.loads(rows[1])
    row["segments"] = [s for s in row["segments"] if s["kind"] != "model"]
    bad.parent.mkdir()
    bad.write_text("\n".join([rows[0], json.dumps(row)]) + "\n")
    assert sft(["--data", bad.parent, *common]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "no non-empty model segment" in err

    assert sft(["--data", samples_file, *common, "--max-length", "50"]) == 1
    err = capsys.readouterr().err
    assert f"all {len(TIR_PROBLEMS)} samples are longer than --max-length 50" in err and "raise --max-length" in err

    (tmp_path / "empty").mkdir()
    assert sft(["--data", tmp_path / "empty", *common]) == 1
    assert "neither samples.jsonl nor a saved `datasets` dataset" in capsys.readouterr().err
    assert not (out / "final").exists()


# ----------------------------------------------------------------- training


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, samples_file, tiny_tir_model) -> Path:
    """4 steps (one epoch) of full fine-tuning from the tied tiny TIR model, checkpoint every 2."""
    out = tmp_path_factory.mktemp("sft") / "straight"
    argv = ["--data", samples_file, "--model", tiny_tir_model, "--out", out, "--max-steps", "4", "--save-steps", "2"]
    assert sft([*argv, *BASE_ARGS]) == 0
    return out


@pytest.mark.slow
def test_sft_run_writes_logs_and_an_untied_export(straight_run) -> None:
    from trainer.sft.export import check_untied
    from trainer.splits import read_training_problems

    out = straight_run
    info = read_json(out / "sft.json")
    assert info["world_size"] == 1 and info["global_step"] == 4 and info["base_tied_embeddings"] is True
    assert info["data"]["kept"] == len(TIR_PROBLEMS) and info["data"]["dropped_too_long"] == 0
    assert info["input_tokens_seen"] == info["data"]["tokens"]  # one epoch, padding not counted
    curve = losses(out)
    assert sorted(curve) == [1, 2, 3, 4]
    # the model memorised these trajectories: the loss on model tokens stays tiny (a mask
    # that trained on prompt or tool-output tokens would be far above this)
    assert max(curve.values()) < 0.01
    assert (out / "loss.png").stat().st_size > 0

    final = out / "final"
    assert_untied(final)
    check_untied(final)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (final / name).is_file(), name
    trained_on = read_training_problems(final)  # what trainer.evaluate refuses to score it on
    assert trained_on is not None and trained_on.problems == [f"tiny/{p.name}" for p in TIR_PROBLEMS]
    card = (final / "README.md").read_text()
    assert "full fine-tuning" in card and f"trained on: {len(TIR_PROBLEMS)}" in card and "final training loss" in card


@pytest.fixture(scope="module")
def served(straight_run, sandbox) -> Iterator:
    """`python -m server` on the SFT export (real vLLM, real sandbox): ThorEngine and its decoder."""
    require_vllm()
    from tests.support.thor_server import run_server, tiny_server_args

    args = tiny_server_args(straight_run / "final", "sft-tiny", sandbox_url=sandbox.url)
    # a readiness bound, not a timed assertion: engine start-up takes minutes on a busy 2-core machine
    with run_server(args, ready_timeout=600) as server:
        yield server


def ask(server, name: str, max_tokens: int = 800) -> tuple[object, dict]:
    """A greedy chat request through the openai SDK, and the decoder's trajectory from its trace."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    resp = client.chat.completions.create(
        model="sft-tiny",
        messages=[{"role": "user", "content": problem(name).prompt}],
        temperature=0,
        max_tokens=max_tokens,
    )
    trace = httpx.get(f"{server.url}/v1/traces/{resp.model_extra['thor']['trace_id']}", timeout=30).json()
    return resp, trace["choices"][0]["trajectory"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.sandbox
def test_sft_export_is_served_with_a_real_tool_round(served) -> None:
    p = problem("modpow")
    resp, _ = ask(served, "modpow", max_tokens=400)
    msg = resp.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert "```python\nprint(pow(7, 100, 13))\n```\n```output\n9\n```" in reasoning
    assert "```output\n14\n```" in reasoning
    thor = resp.model_extra["thor"]["choices"][0]
    assert [c["stdout"] for c in thor["tool_calls"]] == ["9\n", "14\n"] and all(c["ok"] for c in thor["tool_calls"])
    assert thor["answer"] == p.answer and msg.content.endswith("\\boxed{14}.")
    assert resp.choices[0].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.sandbox
def test_rebuilt_segments_equal_decoder_trajectories(served, straight_run) -> None:
    """The real decoder (the server's ThorEngine on vLLM, real sandbox) on the tiny TIR model
    after SFT: its token-level trajectory, the SFT rebuild from the text segments decoded from
    it, and the TirSample SFT trained on agree id for id and mask for mask."""
    tok = exported_tokenizer(straight_run / "final")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = read_json(straight_run / "final" / "generation_config.json")["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])
    samples = {s.problem_id: s for s in tiny_tir_samples(tok)}
    for name in ("modpow", "divisors360", "divzero"):  # 2 and 3 tool rounds; a failed call shown to the model
        p = problem(name)
        resp, traj = ask(served, name)
        assert resp.choices[0].message.content.endswith(f"\\boxed{{{p.answer}}}.")
        kinds = [s["kind"] for s in traj["segments"]]
        assert kinds.count("observation") == p.rounds and kinds[0] == "prompt" and kinds[-1] == "model"
        recorded = [t for s in traj["segments"] for t in s["token_ids"]]
        mask = [1 if s["kind"] == "model" else 0 for s in traj["segments"] for _ in s["token_ids"]]
        assert recorded[-1] == im_end  # vLLM's output ids include the EOS it stopped at

        rebuilt = encode_trajectory_segments(tok, traj)
        assert rebuilt.input_ids == recorded and rebuilt.loss_mask == mask
        assert all((lab != IGNORE_INDEX) == bool(m) for lab, m in zip(rebuilt.labels, mask, strict=True))
        from_sample = encode_segments(tok, samples[name].segments)  # what SFT trained on
        assert from_sample.input_ids == recorded and from_sample.loss_mask == mask


@pytest.mark.slow
def test_resume_continues_the_step_count(tmp_path, samples_file, tiny_tir_model, straight_run, capsys) -> None:
    out = tmp_path / "resumed"
    argv = ["--data", samples_file, "--model", tiny_tir_model, "--out", out, "--save-steps", "2", *BASE_ARGS]
    assert sft([*argv, "--max-steps", "2"]) == 0
    assert read_json(out / "sft.json")["global_step"] == 2
    # the checkpoints of a run are not silently reused or overwritten
    assert sft([*argv, "--max-steps", "4"]) == 1
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err

    assert sft([*argv, "--max-steps", "4", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    info = read_json(out / "sft.json")
    assert info["resumed_from"].endswith("checkpoint-2") and info["global_step"] == 4
    got, want = losses(out), losses(straight_run)
    assert sorted(got) == [1, 2, 3, 4]
    # steps 3-4 ran from the restored weights, optimizer and data position: as if never stopped
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-7), step


@pytest.mark.slow
def test_lora_merged_export(tmp_path, samples_file, tiny_tir_model) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.sft.base_model import load_base_model

    out = tmp_path / "lora"
    argv = ["--data", samples_file, "--model", tiny_tir_model, "--out", out, *BASE_ARGS]
    assert sft([*argv, "--lora", "--lora-r", "4", "--lr", "1e-3", "--max-steps", "2", "--save-steps", "2",
                "--export-dtype", "float32"]) == 0  # fmt: skip
    final = out / "final"
    assert_untied(final)
    assert "LoRA (r=4" in (final / "README.md").read_text()
    assert read_json(out / "sft.json")["settings"]["lora"] is True

    exported = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_tir_model, dtype=torch.float32).eval()
    # plain weights, no adapter modules left
    assert not any("lora" in k for k in exported.state_dict())
    e_sd, b_sd = exported.state_dict(), base.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(e_sd[q], b_sd[q])  # the adapter moved the targeted weights
    assert torch.equal(e_sd["model.embed_tokens.weight"], b_sd["model.embed_tokens.weight"])  # not a LoRA target
    assert torch.equal(e_sd["lm_head.weight"], b_sd["model.embed_tokens.weight"])  # the untied copy

    # the same merge done independently from the saved adapter gives the same model
    untied, was_tied = load_base_model(tiny_tir_model)
    assert was_tied
    merged = PeftModel.from_pretrained(untied, str(out / "checkpoints" / "checkpoint-2")).merge_and_unload().eval()
    ids = torch.tensor([training_sequences(exported_tokenizer(final))[4].token_ids])
    with torch.no_grad():
        a, b, c = exported(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-4  # and it is not the base model's output


def exported_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.long  # two training processes under accelerate: `make test-long`
@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, samples_file, tiny_tir_model) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "trainer/configs/accelerate/ddp_cpu.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "trainer.sft",
        "--data", str(samples_file), "--model", str(tiny_tir_model), "--out", str(out),
        "--max-steps", "2", "--save-steps", "2", *BASE_ARGS,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # both ranks set up the gloo process group and trained
    assert "process 0 of 2 (MULTI_CPU, backend gloo, cpu)" in proc.stderr
    assert "process 1 of 2 (MULTI_CPU, backend gloo, cpu)" in proc.stderr
    info = read_json(out / "sft.json")
    assert info["world_size"] == 2 and info["global_step"] == 2
    # 2 steps x 2 processes x batch 2 = the 8 samples: the data was split between the ranks
    assert read_json(out / "train_log.json")["steps"][-1]["epoch"] == pytest.approx(1.0)
    assert_untied(out / "final")
    assert proc.stdout.strip().splitlines()[-1] == str(out / "final")  # rank 0 alone exported


def test_shipped_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    d = ROOT / "trainer" / "configs" / "accelerate"
    ddp = load_config_from_file(str(d / "ddp_cpu.yaml"))
    assert ddp.num_processes == 2 and ddp.use_cpu is False  # torchrun launcher; see the file's comment
    fsdp = load_config_from_file(str(d / "fsdp2.yaml"))
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp.mixed_precision == "bf16"
    ds = load_config_from_file(str(d / "deepspeed_zero3.yaml"))
    assert ds.distributed_type.value == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 3
    assert ds.deepspeed_config["zero3_save_16bit_model"] is True


@pytest.mark.slow
def test_model_card_takes_evaluation_results(tmp_path, straight_run, capsys) -> None:
    """A trainer.evaluate summary.json (a committed one) added to an exported card later."""
    import shutil

    from trainer.sft.export import main as export_main

    card_dir = tmp_path / "final"
    card_dir.mkdir()
    for name in ("README.md", "thor_sft.json"):
        shutil.copyfile(straight_run / "final" / name, card_dir / name)
    assert "Not evaluated yet" in (card_dir / "README.md").read_text()
    summary = ROOT / "docs" / "eval" / "default-gsm8k-math500" / "summary.json"
    assert export_main([str(card_dir), "--eval-json", str(summary)]) == 0
    card = (card_dir / "README.md").read_text()
    assert "Not evaluated yet" not in card and "### Avg@1 (%)" in card and "gsm8k" in card
    assert read_json(card_dir / "thor_sft.json")["eval_json"] == [str(summary)]
    capsys.readouterr()
    assert export_main([str(card_dir), "--eval-json", str(straight_run / "sft.json")]) == 1
    assert "not a trainer.evaluate summary.json" in capsys.readouterr().err
