#!/usr/bin/env bash
# `make compose-test`: the CPU profile of docker-compose.yml started for real and checked.
#
#   1. a Docker engine (scripts/docker-engine.sh: Debian's docker.io + compose v2 plugin)
#   2. base images from Debian packages (scripts/local-base-images.sh; no registry here)
#   3. the default model in models/ (mounted read-only into the server)
#   4. docker compose --profile cpu build, then up -d --wait
#   5. tests/compose/test_stack.py against the running stack (OpenAI SDK, Redis, Prometheus,
#      the sandbox's isolation)
#   6. the scale-out override on top (deploy/docker-compose.scale*.yml): two server replicas
#      behind the load balancer, two sandbox replicas; tests/compose/test_scale.py
#   7. docker compose down -v, and the engine stopped by its PID (if this script started it)
#
# Each phase prints its duration; on a failure the services' last log lines are printed.
# THOR_COMPOSE_KEEP=1 leaves the stack and the engine running for debugging; the checks'
# settings are in .cache/compose/stack.env, so `set -a; . .cache/compose/stack.env; set +a;
# .venv/bin/python -m pytest tests/compose` reruns them, and `docker compose down -v` (with
# that env) plus `scripts/docker-engine.sh stop` end it.
# The stack runs as compose project `thor-ci` on 127.0.0.1 ports THOR_CI_PORT (18000) and
# THOR_CI_PROMETHEUS_PORT (19090), so it does not collide with a stack of yours.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=thor-ci COMPOSE_PROFILES=cpu
export THOR_BIND=127.0.0.1 THOR_PORT="${THOR_CI_PORT:-18000}"
export PROMETHEUS_BIND=127.0.0.1 PROMETHEUS_PORT="${THOR_CI_PROMETHEUS_PORT:-19090}"
# two clients: the checks exhaust the second one's request budget on purpose
key_a="ci-a-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
key_b="ci-b-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export THOR_API_KEY="$key_a,$key_b" THOR_REQUESTS_PER_MINUTE=20
# a short sandbox queue, so that the back-pressure check fills it with a small burst
export THOR_SANDBOX_POOL_SIZE=4 THOR_SANDBOX_MAX_QUEUE=4
export THOR_STACK_URL="http://127.0.0.1:$THOR_PORT" THOR_STACK_PROMETHEUS="http://127.0.0.1:$PROMETHEUS_PORT"
export THOR_STACK_KEY="$key_a" THOR_STACK_LIMITED_KEY="$key_b" THOR_STACK_SERVER_SERVICE=server-cpu

t0=$(date +%s)
phase() { echo "== compose-test: $1 ($(( $(date +%s) - t0 )) s so far)"; }
stack_up=0
cleanup() {
  local status=$?
  if [[ "${THOR_COMPOSE_KEEP:-0}" == 1 ]]; then
    echo "== THOR_COMPOSE_KEEP=1: the stack and the engine keep running (settings: .cache/compose/stack.env)"
    exit $status
  fi
  if [[ $stack_up -eq 1 ]]; then
    if [[ $status -ne 0 ]]; then
      echo "== the services' last log lines:"
      docker compose logs --no-color --tail 60 || true
    fi
    phase "docker compose down -v"
    docker compose down -v --remove-orphans --timeout 20 || status=1
  fi
  scripts/docker-engine.sh stop || status=1
  echo "== compose-test: $([[ $status -eq 0 ]] && echo passed || echo FAILED) in $(( $(date +%s) - t0 )) s"
  exit $status
}
trap cleanup EXIT

phase "Docker engine"
scripts/docker-engine.sh start
phase "base images from Debian packages"
scripts/local-base-images.sh
# the local base image already carries torch's CPU build (the host's pip settings)
if [[ "$(docker image inspect -f '{{ index .Config.Labels "org.thor.local-base" }}' debian:bookworm-slim)" == debian:bookworm-slim ]]; then
  export THOR_TORCH_CPU_INDEX=""
fi
mkdir -p .cache/compose
env | grep -E '^(COMPOSE_|THOR_|PROMETHEUS_|VLLM_)' | sort >.cache/compose/stack.env
phase "default model"
.venv/bin/python -m thor_engine.models.provision --preset default
phase "docker compose build"
docker compose build --progress quiet
phase "docker compose up --wait"
stack_up=1
docker compose up -d --wait --wait-timeout 900
docker compose ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'
phase "checks against the running stack (tests/compose/test_stack.py)"
.venv/bin/python -m pytest tests/compose/test_stack.py -p no:cacheprovider ${PYTEST_ARGS:-}

# The scale-out shape on the same stack: two server replicas behind the load balancer (which
# takes the published port), two sandbox replicas, Prometheus discovering every replica.
export COMPOSE_FILE=docker-compose.yml:deploy/docker-compose.scale.yml:deploy/docker-compose.scale-cpu.yml
export THOR_SERVER_REPLICAS=2 THOR_SANDBOX_REPLICAS=2 THOR_STACK_SCALED=1
export VLLM_CPU_KVCACHE_SPACE=1  # two CPU engines on one host: 1 GiB of KV cache each
env | grep -E '^(COMPOSE_|THOR_|PROMETHEUS_|VLLM_)' | sort >.cache/compose/stack.env
phase "scale-out: docker compose build + up --wait (2 server replicas, 2 sandbox replicas, load balancer)"
docker compose build --progress quiet
docker compose up -d --wait --wait-timeout 900
docker compose ps --format 'table {{.Name}}\t{{.Status}}\t{{.Ports}}'
phase "checks against the scaled-out stack (tests/compose/test_scale.py)"
.venv/bin/python -m pytest tests/compose/test_scale.py -p no:cacheprovider ${PYTEST_ARGS:-}
