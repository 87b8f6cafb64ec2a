"""The scale-out shape (deploy/docker-compose.scale.yml, deploy/lb/, deploy/SCALING.md), checked without a Docker engine.

`docker compose config` renders the override merged with docker-compose.yml (both profiles),
`haproxy -c` checks the load balancer's configuration, the GPU-slot picker and the sandbox
entrypoint run here as compose would run them (with stand-in commands), `promtool` checks the
documented scrape jobs, and the document's measured figures are recomputed from their sources.
Needs the Docker CLI with its compose plugin (scripts/docker-engine.sh installs both; no engine
is used), haproxy and promtool (scripts/apt-deps.sh); a missing one fails, nothing is skipped.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "docker-compose.yml"
SCALE = ROOT / "deploy" / "docker-compose.scale.yml"
SCALE_CPU = ROOT / "deploy" / "docker-compose.scale-cpu.yml"
LB_DIR = ROOT / "deploy" / "lb"
DOC = ROOT / "deploy" / "SCALING.md"
DOCKER = shutil.which("docker") or "/usr/local/bin/docker"


def compose_config(*files: Path, profile: str, env: dict[str, str] | None = None, tmp: Path) -> dict:
    """`docker compose -f ... --profile P config` as JSON, with no .env and no THOR_* from the caller."""
    env_file = tmp / "empty.env"
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("THOR_", "COMPOSE_"))}
    clean.update(env or {})
    args = [DOCKER, "compose", "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for f in files:
        args += ["-f", str(f)]
    args += ["--profile", profile, "config", "--format", "json"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=clean)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def unescape(value: str) -> str:
    """A rendered value as the container gets it (`config` keeps `$$` escaped)."""
    return value.replace("$$", "$")


def published(service: dict) -> list[str]:
    return [str(p.get("published")) for p in service.get("ports") or []]


def doc_block(after_heading: str, lang: str) -> str:
    """The first ```lang block after a heading of SCALING.md."""
    text = DOC.read_text()
    start = text.index(after_heading)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m, f"no {lang} block after {after_heading!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> dict:
    return compose_config(MAIN, SCALE, profile="gpu", tmp=tmp_path_factory.mktemp("gpu"))


# --- the override merged with the main file


def test_gpu_profile_renders_replicas_behind_the_lb(gpu):
    services = gpu["services"]
    assert {"server", "sandbox", "redis", "prometheus", "lb"} <= set(services)
    server, sandbox, lb = services["server"], services["sandbox"], services["lb"]
    assert server["deploy"]["replicas"] == 2
    assert sandbox["deploy"]["replicas"] == 2
    # the load balancer alone publishes the API, on the port the single server had
    assert not server.get("ports")
    assert published(lb) == ["8000"] and lb["ports"][0]["target"] == 8000
    assert lb["ports"][0]["host_ip"] == "0.0.0.0"
    apis = [name for name, s in services.items() if "8000" in published(s)]
    assert apis == ["lb"]
    # the lb publishes on frontend and reaches every replica as `server` on backend
    assert set(lb["networks"]) == {"frontend", "backend"}
    assert gpu["networks"]["backend"].get("internal") is True
    assert lb["build"]["context"] == str(LB_DIR)
    assert lb["healthcheck"]["test"][0] == "CMD" and "/lb-health" in lb["healthcheck"]["test"][-1]
    # every replica shares the one Redis and reaches the sandbox replicas through the load
    # balancer's sandbox frontend (balanced per call), once that has a healthy sandbox
    cmd = server["command"]
    assert cmd[cmd.index("--redis-url") + 1] == "redis://redis:6379/0"
    assert cmd[cmd.index("--sandbox-url") + 1] == "http://lb:8080"
    assert server["depends_on"]["lb"]["condition"] == "service_healthy"
    assert "8080" in lb["healthcheck"]["test"][-1]
    assert server["environment"]["THOR_FORWARDED_ALLOW_IPS"] == "*"


def test_gpu_reservation_is_every_gpu_split_into_slots(gpu):
    server = gpu["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    # one request for all GPUs (count -1 = all), not the main file's count appended to it
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]
    assert server["entrypoint"][:2] == ["python", "-c"] and len(server["entrypoint"]) == 3
    assert server["environment"]["THOR_GPU_SLOTS"] == "2"
    assert server["environment"]["THOR_GPUS_PER_REPLICA"] == "1"
    # the slot locks live in the volume every replica mounts
    assert any(v["source"] == "model-cache" and v["target"] == "/home/thor/.cache" for v in server["volumes"])
    assert "/home/thor/.cache/thor-gpu-slots" in server["entrypoint"][2]


def test_replica_counts_follow_the_variables(tmp_path):
    env = {"THOR_SERVER_REPLICAS": "3", "THOR_SANDBOX_REPLICAS": "5", "THOR_TENSOR_PARALLEL_SIZE": "2"}
    services = compose_config(MAIN, SCALE, profile="gpu", env=env, tmp=tmp_path)["services"]
    assert services["server"]["deploy"]["replicas"] == 3
    assert services["sandbox"]["deploy"]["replicas"] == 5
    assert services["server"]["environment"]["THOR_GPU_SLOTS"] == "3"
    assert services["server"]["environment"]["THOR_GPUS_PER_REPLICA"] == "2"
    assert services["server"]["environment"]["THOR_TENSOR_PARALLEL_SIZE"] == "2"


def test_sandbox_command_is_the_image_cmd(gpu):
    """An entrypoint set in compose clears the image's CMD, so the override repeats it exactly."""
    dockerfile = (ROOT / "sandbox_image" / "Dockerfile").read_text()
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)[-1])
    assert gpu["services"]["sandbox"]["command"] == cmd


def test_cpu_profile_with_its_override(tmp_path):
    """What `make compose-test` runs: the main file, the scale override and its cpu companion."""
    services = compose_config(MAIN, SCALE, SCALE_CPU, profile="cpu", tmp=tmp_path)["services"]
    assert "server" not in services and {"server-cpu", "sandbox", "lb"} <= set(services)
    cpu = services["server-cpu"]
    assert cpu["deploy"]["replicas"] == 2 and not cpu.get("ports")
    assert cpu["environment"]["THOR_FORWARDED_ALLOW_IPS"] == "*"
    # the same command as the main file's, but for the sandbox behind the load balancer
    main_cmd = compose_config(MAIN, profile="cpu", tmp=tmp_path)["services"]["server-cpu"]["command"]
    sandbox_url = main_cmd.index("--sandbox-url") + 1
    assert cpu["command"] == [*main_cmd[:sandbox_url], "http://lb:8080", *main_cmd[sandbox_url + 1 :]]
    assert cpu["depends_on"]["lb"]["condition"] == "service_healthy"
    # the lb finds the cpu flavour by the alias `server` on the network they share
    assert "server" in (cpu["networks"]["backend"] or {}).get("aliases", [])
    assert "backend" in services["lb"]["networks"]
    assert [name for name, s in services.items() if "8000" in published(s)] == ["lb"]


# --- the load balancer


def test_haproxy_config_is_valid():
    proc = subprocess.run(
        ["haproxy", "-c", "-f", str(LB_DIR / "haproxy.cfg")], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def haproxy_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for raw in (LB_DIR / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def test_haproxy_balances_streams_by_least_connections():
    s = haproxy_sections()
    backend = s["backend thor_servers"]
    assert "balance leastconn" in backend
    assert "option httpchk GET /health" in backend and "http-check expect status 200" in backend
    assert any(line.startswith("server-template server ") and line.endswith(" server:8000") for line in backend)
    default_server = next(line for line in backend if line.startswith("default-server"))
    for word in ("check", "resolvers docker", "init-addr none"):
        assert word in default_server
    frontend = s["frontend thor"]
    assert "bind :8000" in frontend  # the lb's container port in the override
    # the client's own X-Forwarded-For is dropped before HAProxy adds the real one
    assert frontend.index("http-request del-header X-Forwarded-For") < frontend.index("option forwardfor")
    defaults = s["defaults"]
    assert "timeout server 1h" in defaults and "timeout client 1h" in defaults
    assert "retries 2" in defaults
    assert not any("retry-on" in line for line in defaults + backend)  # connection failures only
    assert "nameserver dockerdns 127.0.0.11:53" in s["resolvers docker"]


def test_lb_dockerfile_builds_on_debian_only():
    text = (LB_DIR / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["debian:bookworm-slim"]
    assert "install -y --no-install-recommends haproxy" in text
    assert "COPY haproxy.cfg /etc/haproxy/haproxy.cfg" in text
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, re.M)[-1])
    assert cmd[0] == "haproxy" and cmd[-2:] == ["-f", "/etc/haproxy/haproxy.cfg"]


# --- the entrypoints, run here


def read_line(proc: subprocess.Popen, stream: str, timeout: float = 15.0) -> str:
    pipe = getattr(proc, stream)
    ready, _, _ = select.select([pipe], [], [], timeout)
    assert ready, f"no output on {stream} within {timeout}s"
    return pipe.readline().strip()


def test_gpu_slot_picker_gives_each_replica_its_own_gpus(gpu, tmp_path):
    entrypoint = [unescape(a) for a in gpu["services"]["server"]["entrypoint"]]
    entrypoint[0] = sys.executable
    stand_in = [
        sys.executable,
        "-c",
        "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(60)",
    ]
    env = {**os.environ, "THOR_GPU_SLOTS": "2", "THOR_GPUS_PER_REPLICA": "2", "THOR_GPU_LOCK_DIR": str(tmp_path)}
    env["THOR_GPU_SLOT_WAIT_S"] = "0.2"  # how often a replica without a slot looks again (5 s in the stack)

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            entrypoint + stand_in, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    procs = []
    try:
        procs.append(start())
        assert read_line(procs[0], "stdout") == "0,1"
        procs.append(start())
        assert read_line(procs[1], "stdout") == "2,3"  # the exec'd server still holds slot 0
        procs.append(start())
        assert "all 2 GPU slots taken" in read_line(procs[2], "stderr")
        procs[0].kill()
        procs[0].wait(timeout=10)
        # the waiting replica takes the freed slot on its next round
        assert read_line(procs[2], "stdout") == "0,1"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_sandbox_entrypoint_gives_each_replica_its_cgroup_parent(gpu):
    entrypoint = [unescape(a) for a in gpu["services"]["sandbox"]["entrypoint"]]
    probe = ["/bin/sh", "-c", 'printf %s "$THOR_SANDBOX_CGROUP_PARENT"']
    out = subprocess.run(entrypoint + probe, capture_output=True, text=True, timeout=10, check=True).stdout
    assert out == "THOR_SANDBOX_" + Path("/etc/hostname").read_text().strip()
    # the sandbox reads exactly that variable
    from thor_sandbox.settings import SandboxSettings

    os.environ["THOR_SANDBOX_CGROUP_PARENT"] = out
    try:
        assert SandboxSettings().cgroup_parent == out
    finally:
        del os.environ["THOR_SANDBOX_CGROUP_PARENT"]


# --- the document


def test_scale_scrape_config_passes_promtool_and_is_mounted():
    """prometheus-scale.yml: the main file's jobs and settings, with DNS discovery per replica."""
    path = ROOT / "deploy" / "prometheus" / "prometheus-scale.yml"
    main = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scale = yaml.safe_load(path.read_text())
    assert {j["job_name"] for j in main["scrape_configs"]} < {j["job_name"] for j in scale["scrape_configs"]}
    assert {k: v for k, v in scale.items() if k != "scrape_configs"} == {
        k: v for k, v in main.items() if k != "scrape_configs"
    }
    jobs = {j["job_name"]: j for j in scale["scrape_configs"]}
    assert jobs["thor-server"]["dns_sd_configs"][0]["names"] == ["server"]
    assert jobs["thor-sandbox"]["dns_sd_configs"][0]["names"] == ["sandbox"]
    proc = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "./deploy/prometheus/prometheus-scale.yml:/etc/prometheus/prometheus.yml:ro" in SCALE.read_text()


def records(directory: Path) -> list[dict]:
    """A run's records in the server's default modes, a resumed run's redo replacing the failed line."""
    latest = {}
    with gzip.open(directory / "records.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["mode"] in ("thor", "thor-rl"):
                latest[(r["problem_id"], r["mode"], r["sample"])] = r
    return [r for r in latest.values() if r["error"] is None]


def test_documented_figures_match_their_sources():
    doc = DOC.read_text()
    flat = " ".join(doc.split())

    # sandbox benchmark (docs/benchmarks.md, "Sandbox")
    bench = json.loads((ROOT / "benchmarks" / "results" / "sandbox.json").read_text())
    lat = bench["latency"]
    assert f"p50 **{lat['trivial']['api']['p50_ms']:.1f} ms**" in flat
    assert f"p50 **{lat['sympy']['api']['p50_ms']:.1f} ms** / **{lat['numpy']['api']['p50_ms']:.1f} ms**" in flat
    rates = {t["concurrency"]: t["per_s"] for t in bench["throughput"]}
    assert f"**{rates[1]:.0f}/s** at concurrency 1, **{rates[4]:.0f}/s** at 4, **{rates[16]:.0f}/s** at 16" in flat
    workers = len(bench["worker_memory"])
    assert f"about **{rates[4] / workers:.0f} snippets/s per worker**" in flat

    # tool calls per generated token and execution times (evaluation records)
    groups = {
        "untrained": ["docs/eval/default-gsm8k-math500", "docs/eval/quality-gsm8k", "docs/eval/quality-math500"],
        "sft": ["docs/eval/sft-after"],
        "rl": sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs/training/rl-arith-demo/eval").iterdir()),
    }
    ratio, per_request, durations = {}, {}, []
    for name, dirs in groups.items():
        rs = [r for d in dirs for r in records(ROOT / d)]
        calls = sum(len(r["tool_calls"]) for r in rs)
        assert calls == sum(r["tools"]["calls"] for r in rs)
        tokens = sum(r["usage"]["generated_tokens"] for r in rs)
        durations += [c["duration_s"] for r in rs for c in r["tool_calls"]]
        ratio[name] = 1000 * calls / tokens
        per_request[name] = (tokens / len(rs), calls / len(rs))
        expected = (
            f"**{ratio[name]:.2f}** ({calls} calls / {tokens:,} tokens, {len(rs)} samples, "
            f"{tokens / len(rs):.0f} tokens per sample)"
        )
        assert expected in flat, expected
    durations.sort()
    mean = sum(durations) / len(durations)
    p50, p95 = durations[len(durations) // 2], durations[int(0.95 * len(durations))]
    expected = (
        f"mean **{1000 * mean:.0f} ms**, p50 {1000 * p50:.0f} ms, p95 {1000 * p95:.0f} ms ({len(durations)} executions)"
    )
    assert expected in flat, expected
    assert f"about **{1 / mean:.0f} snippets/s per busy worker**" in flat

    # the cache hits seen in sft-after's thor-cotq mode
    with gzip.open(ROOT / "docs/eval/sft-after/records.jsonl.gz", "rt") as f:
        cotq = [c for line in f for r in [json.loads(line)] if r["mode"] == "thor-cotq" for c in r["tool_calls"]]
    assert f"{sum(c['duration_s'] == 0 for c in cotq)} of {len(cotq)} calls" in flat

    # the worked example's arithmetic (2,500 tokens/s is the stated assumption)
    tps = 2500
    snippets = tps * round(ratio["sft"], 2) / 1000
    busy = snippets * round(mean, 3)
    assert f"= **{snippets:.1f} snippets/s**" in flat
    assert f"{snippets:.1f} x {round(mean, 3)} s = **{busy:.1f}**" in flat
    assert f"**{round(2 * busy)} workers** per GPU" in flat
    tokens_per_request, calls_per_request = per_request["sft"]
    rps = tps / round(tokens_per_request)
    ops = 4 + 2 * round(calls_per_request, 2)
    assert f"{rps:.1f} requests/s with {calls_per_request:.2f} tool calls each" in flat
    assert f"{ops:.1f} round trips per request, **{rps * ops:.0f} operations/s per GPU**" in flat
    assert (
        f"{tps * round(ratio['rl'], 2) / 1000:.1f} snippets/s, {tps * round(ratio['rl'], 2) / 1000 * round(mean, 3):.1f} busy workers"
        in flat
    )


def test_documented_ratio_snippet_runs():
    code = doc_block("How the tool-call ratios are computed", "python")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(DOC.read_text().split())
    for line in proc.stdout.splitlines():
        m = re.search(r"= ([\d.]+) per 1,000", line)
        assert m and f"**{m.group(1)}**" in flat, line


def test_document_is_honest_about_what_ran():
    text = DOC.read_text()
    assert "the GPU parts have not run" in text and "no GPU" in text and "make compose-test" in text
    for name in (
        "THOR_SERVER_REPLICAS",
        "THOR_SANDBOX_REPLICAS",
        "server-cpu",
        "docker-compose.scale.yml",
        "docker-compose.scale-cpu.yml",
        "tests/compose/test_scale.py",
    ):
        assert name in text
