"""The serving stack's files (docker-compose.yml, the Dockerfiles, deploy/), checked without a Docker engine.

The stack itself is started and checked by `make compose-test` (tests/compose/); these
fast checks run in `make test`: the compose file is checked
against the published Compose specification schema and against what the services need
(nsjail's capabilities, the GPU reservation, health checks, an internal network); the
Prometheus configuration and alert rules are checked and unit-tested with the real
`promtool`; every PromQL expression of the Grafana dashboard and of the alert rules is
checked against the metric names the server and sandbox export (read from the real
`ServerMetrics` and `SandboxMetrics` registries, so renaming a metric breaks these tests),
and evaluated by a real `prometheus` (Debian's) scraping live endpoints that serve those
real registries. promtool and prometheus are required: a missing binary fails, never skips.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from tests.support.shared_data import schema_path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = schema_path("compose-spec.json")
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROM_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "thor.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "thor.json"
SERVER_DOCKERFILE = ROOT / "server" / "Dockerfile"
DEPLOY_README = ROOT / "deploy" / "README.md"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
# The live-Prometheus waits end when Prometheus has done the thing (scraped, evaluated); this
# bound only stops a hung test on a busy machine and is no speed requirement.
LIVENESS_S = 120


def exported_metrics(registry) -> dict[str, str]:
    """name -> type of every metric a prometheus_client registry exports (counters with `_total`)."""
    return {(f"{f.name}_total" if f.type == "counter" else f.name): f.type for f in registry.collect()}


def project_metrics() -> dict[str, str]:
    """The metrics the server's and the sandbox's own /metrics export, read from the real classes."""
    from server.metrics import ServerMetrics
    from thor_sandbox.metrics import SandboxMetrics

    server, sandbox = exported_metrics(ServerMetrics().registry), exported_metrics(SandboxMetrics().registry)
    assert server and sandbox and not set(server) & set(sandbox)
    return {**server, **sandbox}


# vLLM's engine metrics, appended to the server's /metrics by vLLM itself (not ours to rename).
VLLM_METRICS: dict[str, str] = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",  # name in older vLLM releases
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
}
# Every metric the dashboard and the alert rules may chart: name -> type.
METRICS: dict[str, str] = {**project_metrics(), **VLLM_METRICS, "up": "gauge"}  # up: Prometheus' per-target series
# What the dashboard must chart (each must also be exported: checked below).
CHARTED = {
    "thor_requests_total",
    "thor_request_duration_seconds",
    "thor_time_to_first_token_seconds",
    "thor_generated_tokens_total",
    "thor_discarded_tokens_total",
    "thor_tool_calls_total",
    "thor_tool_duration_seconds",
    "thor_backtracks_total",
    "thor_tool_rounds_per_request",
    "thor_tool_cache_hits_total",
    "thor_rate_limited_total",
    "thor_requests_in_flight",
    "thor_store_errors_total",
    "thor_sandbox_executions_total",
    "thor_sandbox_execution_duration_seconds",
    "thor_sandbox_queue_depth",
    "thor_sandbox_workers",
    "thor_sandbox_worker_restarts_total",
    "thor_sandbox_rejected_total",
    *VLLM_METRICS,
    "up",
}


def series_names(metrics: dict[str, str]) -> set[str]:
    """The series names Prometheus stores for these metrics (a histogram is _bucket, _sum and _count)."""
    return {
        series
        for name, kind in metrics.items()
        for series in ([f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name])
    }


SERIES_NAMES = series_names(METRICS)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}


# ---------------------------------------------------------------------------- helpers


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> Iterator[dict]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows carry their panels


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in all_panels(dash) for t in p.get("targets", []) if t.get("expr")]


def rule_exprs() -> list[tuple[str, str]]:
    rules = load_yaml(PROM_RULES)
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, labels and literals removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"(?<![A-Za-z0-9_:.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", s)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group())
    return names


def balanced(expr: str) -> bool:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # .ci/run installs it; a missing binary is a broken set-up, not a reason to skip
    assert PROMTOOL is not None, "promtool not installed: run scripts/apt-deps.sh (Debian's prometheus)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_sources(service: dict) -> list[str]:
    sources = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source = vol.split(":", 1)[0]
            if source.startswith((".", "/", "~")):  # otherwise a named volume
                sources.append(source)
        elif vol.get("type") == "bind":
            sources.append(vol["source"])
    return sources


# ---------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_specification(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_has_the_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {"server", "server-cpu", "sandbox", "redis", "prometheus", "grafana"}
    profiles = {name: svc.get("profiles") for name, svc in services.items()}
    assert profiles == {
        "server": ["gpu"],
        "server-cpu": ["cpu"],
        "sandbox": None,
        "redis": None,
        "prometheus": None,
        "grafana": ["gpu", "grafana"],  # the one registry image: not in the cpu profile CI runs
    }
    for name, svc in services.items():
        assert svc.get("init") is True, f"{name}: init: true, so that `down` does not wait for a deaf PID 1"


def test_the_two_server_flavours_differ_only_where_they_must(compose):
    gpu, cpu = compose["services"]["server"], compose["services"]["server-cpu"]
    for key in ("restart", "init", "ports", "volumes", "depends_on"):
        assert gpu[key] == cpu[key], key
    assert {k: v for k, v in gpu["build"].items() if k != "args"} == {
        k: v for k, v in cpu["build"].items() if k != "args"
    }
    assert gpu["build"]["args"]["VLLM_TARGET"] == "gpu" and cpu["build"]["args"]["VLLM_TARGET"] == "cpu"
    assert gpu["build"]["args"]["BASE_IMAGE"].startswith("${THOR_CUDA_IMAGE:-nvidia/cuda:")
    assert cpu["build"]["args"]["BASE_IMAGE"] == "debian:bookworm-slim"
    assert "deploy" in gpu and "deploy" not in cpu, "only the gpu flavour reserves GPUs"
    # the same command but for the default model (a local one) and eager mode on CPU
    gpu_flags, cpu_flags = gpu["command"], [a for a in cpu["command"] if a != "--enforce-eager"]
    model = gpu_flags.index("--model") + 1
    assert gpu_flags[:model] + gpu_flags[model + 1 :] == cpu_flags[:model] + cpu_flags[model + 1 :]
    assert cpu_flags[model] == "${THOR_MODEL:-default}"
    # every server setting of the gpu flavour reaches the cpu one too
    assert set(gpu["environment"]) <= set(cpu["environment"])
    # both answer as `server` on the backend network (Prometheus's scrape target)
    assert "server" in cpu["networks"]["backend"]["aliases"]


def test_build_contexts_and_dockerfiles_exist(compose):
    built = {name: svc["build"] for name, svc in compose["services"].items() if "build" in svc}
    assert set(built) == {"server", "server-cpu", "sandbox", "redis", "prometheus"}
    for name, build in built.items():
        context = (ROOT / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        if name in ("server", "server-cpu", "sandbox"):
            assert context == ROOT, f"{name}: the build context is the repository root"
    assert compose["services"]["server"]["build"]["dockerfile"] == "server/Dockerfile"
    assert compose["services"]["sandbox"]["build"]["dockerfile"] == "sandbox_image/Dockerfile"


def test_every_image_builds_from_the_two_debian_bases_or_cuda(compose):
    """No registry image but the bases: debian:bookworm-slim and python:3.12-slim-bookworm (made
    from Debian packages by scripts/local-base-images.sh where no registry is reachable) and,
    for the gpu server only, NVIDIA's CUDA image."""
    for name, svc in compose["services"].items():
        if "build" not in svc:
            assert name == "grafana", f"{name} pulls {svc['image']}"
            continue
        text = (ROOT / svc["build"]["context"] / svc["build"].get("dockerfile", "Dockerfile")).read_text()
        bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
        assert bases, name
        for base in bases:
            if base == "${BASE_IMAGE}":
                default = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
                assert default.startswith("nvidia/cuda:"), default
                assert svc["build"]["args"]["BASE_IMAGE"] in (
                    "debian:bookworm-slim",
                    "${THOR_CUDA_IMAGE:-" + default + "}",
                )
            else:
                assert base in ("debian:bookworm-slim", "python:3.12-slim-bookworm"), f"{name}: FROM {base}"


def test_every_bind_mounted_repository_path_exists(compose):
    checked = 0
    for name, svc in compose["services"].items():
        for source in bind_sources(svc):
            if source.startswith("/"):
                continue  # a host path (/sys/fs/cgroup), not part of the repository
            assert (ROOT / source).exists(), f"{name}: bind source {source} does not exist"
            checked += 1
    assert checked >= 5


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and not vol.startswith((".", "/", "~", "${")):
                assert vol.split(":", 1)[0] in declared, f"{name}: volume {vol} not declared"
    assert {"model-cache", "prometheus-data", "grafana-data"} <= declared


@pytest.mark.parametrize("service", ["server", "server-cpu"])
def test_server_service(compose, service):
    server = compose["services"][service]
    command = [a for a in server["command"] if a != "--enforce-eager"]  # the one flag without a value
    assert command[:3] == ["python", "-m", "server"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))  # every flag has a value
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8000"
    assert flags["--model"].startswith("${THOR_MODEL:-")
    assert flags["--sandbox-url"] == "http://sandbox:8080"
    assert flags["--redis-url"] == "redis://redis:6379/0"
    # published on the host, container port 8000
    assert any(str(p).endswith(":8000") for p in server["ports"])
    # health check on GET /health
    test = " ".join(server["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in test
    # starts after a healthy sandbox and redis
    assert server["depends_on"]["sandbox"]["condition"] == "service_healthy"
    assert "redis" in server["depends_on"]
    # Hugging Face cache on a named volume
    assert any(v.startswith("model-cache:") for v in server["volumes"])


def interpolate_defaults(value: object) -> object:
    """What compose renders with no variables set: every ${VAR:-default} becomes its default."""
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return value


@pytest.mark.parametrize(("service", "model"), [("server", "Qwen/Qwen2.5-Math-7B-Instruct"), ("server-cpu", "default")])
def test_server_command_and_environment_are_real_server_settings(compose, monkeypatch, service, model):
    """The flags and THOR_* variables compose passes are ones `python -m server` accepts, with valid values."""
    from server.__main__ import parse_args
    from server.settings import ServerSettings
    from thor_engine.models import provision

    server = compose["services"][service]
    for name in list(os.environ):
        if name.startswith("THOR_"):
            monkeypatch.delenv(name)
    for name, value in server["environment"].items():
        if name == "THOR_MODELS_DIR":  # where model names resolve (thor_engine.models.provision)
            assert name in Path(provision.__file__).read_text()
            continue
        if name.startswith("THOR_"):
            assert name[len("THOR_") :].lower() in ServerSettings.model_fields, f"{name} is not a server setting"
            if value is not None:
                monkeypatch.setenv(name, str(interpolate_defaults(value)))
    overrides = parse_args([interpolate_defaults(a) for a in server["command"][3:]])
    if service == "server-cpu":
        assert overrides.pop("enforce_eager") is True
    settings = ServerSettings(**overrides)
    assert settings.model == model
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.sandbox_url == "http://sandbox:8080" and settings.redis_url == "redis://redis:6379/0"
    assert settings.tensor_parallel_size == 1 and settings.gpu_memory_utilization == 0.9
    monkeypatch.setenv("THOR_API_KEY", "k1,k2")
    keys = ServerSettings().api_keys()
    assert len(keys) == 2 and keys.identify("k1") and keys.identify("k2")


def test_sandbox_environment_is_real_sandbox_settings(compose, monkeypatch):
    from thor_sandbox.settings import SandboxSettings

    env = compose["services"]["sandbox"]["environment"]
    for name, value in env.items():
        assert name.startswith("THOR_SANDBOX_")
        assert name[len("THOR_SANDBOX_") :].lower() in SandboxSettings.model_fields, f"{name} is not a sandbox setting"
        monkeypatch.setenv(name, str(interpolate_defaults(value)))
    settings = SandboxSettings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.pool_size == 4 and settings.use_cgroups is True


def test_server_reserves_nvidia_gpus(compose):
    devices = compose["services"]["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    gpu = devices[0]
    assert gpu["driver"] == "nvidia"
    assert gpu["capabilities"] == ["gpu"]
    m = re.fullmatch(r"\$\{(\w+):-(\w+)\}", str(gpu["count"]))
    assert m and m.group(2) == "1", "GPU count comes from an env var with default 1"


def test_sandbox_has_what_nsjail_needs_and_is_not_published(compose):
    sandbox = compose["services"]["sandbox"]
    assert "SYS_ADMIN" in sandbox["cap_add"]
    assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= set(sandbox["security_opt"])
    assert sandbox["cgroup"] == "host"
    mounts = {v["target"]: v for v in sandbox["volumes"] if isinstance(v, dict)}
    assert mounts["/sys/fs/cgroup"]["source"] == "/sys/fs/cgroup"
    assert not mounts["/sys/fs/cgroup"].get("read_only", False)
    assert "privileged" not in sandbox, "SYS_ADMIN + unconfined profiles are enough; never --privileged"
    assert "ports" not in sandbox, "the sandbox must not be published on the host"
    assert "8080" in [str(p) for p in sandbox.get("expose", [])]
    assert "/health" in " ".join(sandbox["healthcheck"]["test"])
    # the same options the sandbox image documents for `docker run`
    dockerfile = (ROOT / "sandbox_image" / "Dockerfile").read_text()
    for option in ("--cap-add SYS_ADMIN", "seccomp=unconfined", "apparmor=unconfined", "/sys/fs/cgroup"):
        assert option in dockerfile


def test_redis_service(compose):
    redis = compose["services"]["redis"]
    assert redis["build"]["context"] == "deploy/redis"
    assert "redis-server" in (ROOT / "deploy" / "redis" / "Dockerfile").read_text()
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "ports" not in redis


def test_networks_keep_sandbox_and_redis_internal(compose):
    networks = compose["networks"]
    assert networks["backend"]["internal"] is True
    services = compose["services"]
    assert services["sandbox"]["networks"] == ["backend"]
    assert services["redis"]["networks"] == ["backend"]
    assert {"frontend", "backend"} <= set(services["server"]["networks"])
    assert {"frontend", "backend"} <= set(services["server-cpu"]["networks"])
    assert {"frontend", "backend"} <= set(services["prometheus"]["networks"])
    # published services need a non-internal network
    for name, svc in services.items():
        if svc.get("ports"):
            assert any(not (networks.get(n) or {}).get("internal") for n in svc["networks"]), name


def test_monitoring_services(compose):
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["build"]["context"] == "deploy/prometheus"
    assert "prometheus" in (ROOT / "deploy" / "prometheus" / "Dockerfile").read_text()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert any(str(p).endswith(":9090") for p in prometheus["ports"])
    assert grafana["image"].startswith("grafana/grafana:")
    assert any(str(p).endswith(":3000") for p in grafana["ports"])
    # the provider's path is where compose mounts the dashboards
    provider = load_yaml(GRAFANA_PROVIDER)["providers"][0]
    targets = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert targets[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name


def test_env_interpolations_have_defaults_and_are_documented(compose):
    text = COMPOSE_FILE.read_text()
    readme = DEPLOY_README.read_text()
    refs = re.findall(r"\$\{([^}]*)\}", text)
    assert refs
    for ref in refs:
        m = re.fullmatch(r"(\w+)(:?-)(.*)", ref)
        assert m, f"${{{ref}}} has no default"
        name = m.group(1)
        assert name in readme, f"{name} is not documented in deploy/README.md"
    env = {**compose["services"]["server"]["environment"], **compose["services"]["server-cpu"]["environment"]}
    for name, value in env.items():
        if value is None:  # passed through only when set
            assert name in readme, f"{name} is not documented in deploy/README.md"


def test_server_dockerfile():
    text = SERVER_DOCKERFILE.read_text()
    assert re.search(r"^FROM\s+\S+", text, re.M)
    assert re.search(r"^ARG VLLM_TARGET=gpu$", text, re.M) and 'install-vllm.sh "${VLLM_TARGET}"' in text
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", text, re.M)
    # only what the server runs: no tests, fixtures, trainer or dev tooling in the image
    copied = " ".join(re.findall(r"^COPY\s+(.+)$", text, re.M))
    for absent in ("tests", "trainer", "benchmarks", "docs", ".venv"):
        assert not re.search(rf"(^|\s){absent}(/|\s)", copied), f"the image copies {absent}"
    assert re.search(r"pip install \./sandbox_image \.", text)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r'^CMD \["python", "-m", "server"', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the server does not run as root"
    # every COPY source exists in the build context (the repository root)
    sources = 0
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
            sources += 1
    assert sources >= 5


def test_deploy_readme_covers_running_the_stack():
    readme = DEPLOY_README.read_text()
    for needle in (
        "docker compose --profile gpu up -d",
        "docker compose --profile cpu up -d",
        "make compose-test",
        "the gpu profile has not been started",
        "3000",
        "9090",
        "8000",
        "THOR_MODEL",
        "nvidia",
    ):
        assert needle in readme, needle


# ---------------------------------------------------------------------------- prometheus


def test_prometheus_scrape_config():
    config = load_yaml(PROM_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["thor-server"]["static_configs"][0]["targets"] == ["server:8000"]
    assert jobs["thor-sandbox"]["static_configs"][0]["targets"] == ["sandbox:8080"]
    for name in ("thor-server", "thor-sandbox"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == [PROM_RULES.name]


def test_promtool_check_config():
    result = run_promtool("check", "config", str(PROM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules():
    result = run_promtool("check", "rules", str(PROM_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_rule_unit_tests(tmp_path):
    """The alerts fire on the conditions they describe (and not on healthy series)."""
    tests = {
        "rule_files": [str(PROM_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="thor-server", instance="server:8000"}', "values": "0x10"},
                    {"series": 'up{job="thor-sandbox", instance="sandbox:8080"}', "values": "1x10"},
                    {"series": 'thor_requests_total{route="/v1/chat/completions", status="200"}', "values": "0+60x20"},
                    {"series": 'thor_requests_total{route="/v1/chat/completions", status="503"}', "values": "0+30x20"},
                    {"series": 'thor_sandbox_rejected_total{reason="queue_full"}', "values": "0+5x20"},
                    {"series": 'thor_store_errors_total{operation="cache_get"}', "values": "0x20"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "ThorServerDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "job": "thor-server", "instance": "server:8000"},
                                "exp_annotations": {"summary": "THOR server server:8000 is not answering /metrics"},
                            }
                        ],
                    },
                    {"eval_time": "5m", "alertname": "ThorSandboxDown", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "ThorHighErrorRate",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning"},
                                "exp_annotations": {"summary": "More than 5% of THOR requests fail with 5xx"},
                            }
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "ThorSandboxRejecting",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning"},
                                "exp_annotations": {
                                    "summary": "The sandbox pool is refusing snippets (busy); raise THOR_SANDBOX_POOL_SIZE"
                                },
                            }
                        ],
                    },
                    {"eval_time": "15m", "alertname": "ThorStoreErrors", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- grafana


def test_grafana_datasource_provisioning():
    ds = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    assert len(ds) == 1
    assert ds[0]["type"] == "prometheus" and ds[0]["uid"] == "prometheus"
    assert ds[0]["url"] == "http://prometheus:9090"


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    assert "${DS_PROMETHEUS}" not in DASHBOARD.read_text()
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    charts = [p for p in panels if p["type"] != "row"]
    assert len(charts) >= 20
    for p in charts:
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]


def test_dashboard_charts_every_required_metric(dashboard):
    assert CHARTED <= set(METRICS), f"required charts of metrics nobody exports: {sorted(CHARTED - set(METRICS))}"
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs(dashboard)))
    base = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in METRICS else n for n in used}
    missing = CHARTED - base
    assert not missing, f"metrics not charted: {sorted(missing)}"


def test_renaming_a_server_metric_breaks_the_dashboard_check(monkeypatch, dashboard):
    """The known names are read from ServerMetrics: rename one there and the dashboard uses an unknown name."""
    import server.metrics

    real = server.metrics.Counter

    def renamed(name: str, *args, **kwargs):
        return real("thor_http_requests_total" if name == "thor_requests_total" else name, *args, **kwargs)

    monkeypatch.setattr(server.metrics, "Counter", renamed)
    known = series_names({**project_metrics(), **VLLM_METRICS, "up": "gauge"})
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs(dashboard)))
    assert used - known == {"thor_requests_total"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_promql_uses_only_known_metrics_and_parses(source, dashboard):
    exprs = dashboard_exprs(dashboard) if source == "dashboard" else rule_exprs()
    assert exprs
    for title, expr in exprs:
        assert balanced(expr), f"{title}: unbalanced brackets in {expr}"
        unknown_vars = set(re.findall(r"\$\w+", expr)) - set(GRAFANA_VARIABLES)
        assert not unknown_vars, f"{title}: unknown variables {unknown_vars}"
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        unknown = names - SERIES_NAMES
        assert not unknown, f"{title}: unknown metric names {sorted(unknown)} in {expr}"


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.95, sum by (le, route) (rate(thor_request_duration_seconds_bucket"
        '{route=~"/v1/.*"}[5m]))) / clamp_min(sum(rate(thor_requests_total[1m])), 1e-9)'
        " or vllm:kv_cache_usage_perc > bool 0.5"
    )
    assert metric_names(expr) == {
        "thor_request_duration_seconds_bucket",
        "thor_requests_total",
        "vllm:kv_cache_usage_perc",
    }
    assert not balanced("sum(rate(x[1m])")


# ---------------------------------------------------------------------------- live prometheus


def sample_registries():
    """The real server and sandbox metric registries (plus vLLM's engine metrics), with some traffic.

    Traffic goes through the attributes of `ServerMetrics` and `SandboxMetrics`, so the
    live Prometheus scrapes exactly the names and labels the services export.
    """
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from server.metrics import ServerMetrics
    from thor_sandbox.metrics import SandboxMetrics

    srv, sbx, engine = ServerMetrics(), SandboxMetrics(), CollectorRegistry()
    Gauge("vllm:num_requests_running", "", registry=engine).set(3)
    Gauge("vllm:num_requests_waiting", "", registry=engine).set(1)
    Gauge("vllm:kv_cache_usage_perc", "", registry=engine).set(0.42)
    prompt_tokens = Counter("vllm:prompt_tokens_total", "", registry=engine)
    gen_tokens = Counter("vllm:generation_tokens_total", "", registry=engine)
    engine_ttft = Histogram("vllm:time_to_first_token_seconds", "", registry=engine)
    sbx.queue_depth.set(2)
    sbx.workers.labels("idle").set(3)
    sbx.workers.labels("busy").set(1)

    def traffic() -> None:
        srv.requests.labels("/v1/chat/completions", "200").inc(5)
        srv.requests.labels("/v1/chat/completions", "429").inc()
        srv.request_duration.labels("/v1/chat/completions").observe(3.2)
        srv.ttft.observe(0.08)
        srv.generated_tokens.inc(400)
        srv.discarded_tokens.inc(30)
        srv.tool_calls.labels("ok").inc(3)
        srv.tool_calls.labels("error").inc()
        srv.tool_duration.observe(0.05)
        srv.backtracks.inc()
        srv.tool_rounds.observe(2)
        srv.cache_hits.inc()
        srv.rate_limited.inc()
        srv.in_flight.set(4)
        srv.store_errors.labels("cache_get").inc()
        prompt_tokens.inc(100)
        gen_tokens.inc(430)
        engine_ttft.observe(0.07)
        sbx.executions.labels("ok").inc(3)
        sbx.duration.labels("ok").observe(0.01)
        sbx.worker_restarts.labels("recycled").inc()
        sbx.rejected.labels("queue_full").inc()

    return [srv.registry, engine], [sbx.registry], traffic


def serve_registries(registries) -> http.server.ThreadingHTTPServer:
    """One /metrics endpoint concatenating registries (as ServerMetrics.exposition appends vLLM's)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"".join(generate_latest(registry) for registry in registries)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory) -> Iterator[str]:
    """Debian's prometheus running the repository's scrape jobs and alert rules against the real registries."""
    # .ci/run installs it; a missing binary is a broken set-up, not a reason to skip
    assert PROMETHEUS is not None, "prometheus not installed: run scripts/apt-deps.sh (Debian's prometheus)"
    srv, sbx, traffic = sample_registries()
    traffic()
    endpoints = {"thor-server": serve_registries(srv), "thor-sandbox": serve_registries(sbx)}
    stop = threading.Event()

    def keep_traffic() -> None:
        while not stop.wait(0.5):
            traffic()

    threading.Thread(target=keep_traffic, daemon=True).start()

    # The repository's config, with each job pointed at its local sample endpoint.
    config = load_yaml(PROM_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_RULES)]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in endpoints]
    for job in config["scrape_configs"]:
        host, port = endpoints[job["job_name"]].server_address[:2]
        job["static_configs"][0]["targets"] = [f"{host}:{port}"]
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LIVENESS_S
        while True:
            assert proc.poll() is None, f"prometheus exited: {(tmp / 'prometheus.log').read_text()}"
            try:
                up = httpx.get(f"{url}/api/v1/query", params={"query": "up == 1"}, timeout=2).json()
                if len(up["data"]["result"]) == len(endpoints):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # still starting: 503 "Service Unavailable" is plain text, not JSON
            assert time.monotonic() < deadline, "the sample targets were never scraped"
            time.sleep(0.5)
        yield url
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for httpd in endpoints.values():
            httpd.shutdown()
            httpd.server_close()


def query(url: str, expr: str) -> dict:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]


@pytest.mark.slow
def test_live_prometheus_scrapes_both_jobs(live_prometheus):
    targets = httpx.get(f"{live_prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {"thor-server": "up", "thor-sandbox": "up"}
    assert {t["labels"]["service"] for t in targets} == {"server", "sandbox"}


@pytest.mark.slow
def test_live_prometheus_evaluates_every_dashboard_expression(live_prometheus, dashboard):
    # wait until rates have two samples in their window
    deadline = time.monotonic() + LIVENESS_S
    while not query(live_prometheus, "sum by (status) (rate(thor_requests_total[1m]))")["result"]:
        assert time.monotonic() < deadline, "rate() never produced a sample"
        time.sleep(0.5)
    empty = []
    for title, expr in dashboard_exprs(dashboard):
        data = query(live_prometheus, substitute(expr))
        if not data["result"]:
            empty.append(f"{title}: {expr}")
    assert not empty, "expressions with no data although every metric is exported:\n" + "\n".join(empty)
    statuses = {
        r["metric"]["status"]
        for r in query(live_prometheus, "sum by (status) (rate(thor_requests_total[1m]))")["result"]
    }
    assert statuses == {"200", "429"}
    p95 = query(
        live_prometheus,
        substitute(
            "histogram_quantile(0.95, sum by (le) (rate(thor_request_duration_seconds_bucket[$__rate_interval])))"
        ),
    )
    value = float(p95["result"][0]["value"][1])
    assert 1 <= value <= 5 and not math.isnan(value)
    kv = query(live_prometheus, "max(vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc)")
    assert float(kv["result"][0]["value"][1]) == pytest.approx(0.42)


@pytest.mark.slow
def test_live_prometheus_loads_and_evaluates_the_alert_rules(live_prometheus):
    deadline = time.monotonic() + LIVENESS_S
    while True:
        groups = httpx.get(f"{live_prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, "the alert rules were never evaluated"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == {name for name, _ in rule_exprs()}
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
    for _name, expr in rule_exprs():
        query(live_prometheus, expr)
