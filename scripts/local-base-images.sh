#!/usr/bin/env bash
# Build the stack's base images from Debian packages, for a Docker engine that reaches
# no container registry (this project's CI machines):
#
#   debian:bookworm-slim        mmdebstrap --variant=minbase bookworm, from the host's own apt
#                               sources, plus the host's CA certificates and pip settings
#   python:3.12-slim-bookworm   that, plus the host's CPython 3.12 in /usr/local
#
# Both are tagged with the names the Dockerfiles use, so the Dockerfiles are the same
# ones a host with a registry builds. An image of either name that this script did not
# build (no org.thor.local-base label: pulled from a registry) is left alone.
#
#   scripts/local-base-images.sh [--rebuild]      (about a minute the first time)
#
# Inputs it reads from the host, copied into .cache/local-base/ (git-ignored) and never
# committed: the apt sources file, /usr/local/share/ca-certificates/*.crt, the wheel
# folders named by pip's find-links setting (this host keeps torch's CPU build there),
# and a Python 3.12 (PY312, else pyenv's, else python3.12 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

REBUILD=0; [[ "${1:-}" == --rebuild ]] && REBUILD=1
CTX=.cache/local-base
MINBASE=thor-local/debian-minbase:bookworm
LABEL=org.thor.local-base

ours_or_absent() {  # true when the tag is absent or was built by this script
  local label
  label=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null) || return 0
  [[ -n "$label" && "$label" != "<no value>" ]]
}

# 1. the minbase root filesystem, straight from Debian's archive
if [[ $REBUILD -eq 1 ]] || ! docker image inspect "$MINBASE" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || {
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  }
  sources=/etc/apt/sources.list.d/debian.sources
  [[ -f $sources ]] || sources=/etc/apt/sources.list
  echo "mmdebstrap: bookworm minbase from $sources -> $MINBASE"
  mmdebstrap --variant=minbase --quiet bookworm - "$sources" | docker import - "$MINBASE" >/dev/null
fi

# 2. debian:bookworm-slim: minbase + the host's CA certificates, pip settings and wheels
rm -rf "$CTX" && mkdir -p "$CTX/debian/ca-certificates" "$CTX/debian/wheels" "$CTX/python"
shopt -s nullglob
for crt in /usr/local/share/ca-certificates/*.crt; do cp "$crt" "$CTX/debian/ca-certificates/"; done
find_links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
for dir in ${PIP_FIND_LINKS:-} $find_links; do
  [[ -d "$dir" ]] || continue
  for whl in "$dir"/*.whl; do ln -f "$whl" "$CTX/debian/wheels/" 2>/dev/null || cp "$whl" "$CTX/debian/wheels/"; done
done
{
  echo "# pip settings of the image build host (scripts/local-base-images.sh)"
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  echo "find-links = /opt/wheels"
} >"$CTX/debian/pip.conf"
if ours_or_absent debian:bookworm-slim; then
  echo "building debian:bookworm-slim (local stand-in; $(ls "$CTX/debian/ca-certificates" | wc -l) CA file(s), $(ls "$CTX/debian/wheels" | wc -l) wheel(s))"
  docker build -q --build-arg "MINBASE=$MINBASE" -f deploy/local-base/debian.Dockerfile -t debian:bookworm-slim "$CTX/debian" >/dev/null
else
  echo "debian:bookworm-slim exists and was not built here: using it as it is"
fi

# 3. python:3.12-slim-bookworm: + the host's CPython 3.12 (without its test suite)
PY312="${PY312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -n1)}"
PY312="${PY312:-$(command -v python3.12 || true)}"
[[ -n "$PY312" ]] || { echo "error: no Python 3.12 found; set PY312=/path/to/python3.12" >&2; exit 1; }
prefix=$("$PY312" -c 'import sys; print(sys.base_prefix)')
if ours_or_absent python:3.12-slim-bookworm; then
  echo "building python:3.12-slim-bookworm (local stand-in; CPython from $prefix)"
  tar -C "$prefix" -cf - --exclude=./lib/python3.12/test --exclude='*.pth' --exclude=__pycache__ . | tar -C "$CTX/python" -xf -
  docker build -q -f deploy/local-base/python.Dockerfile -t python:3.12-slim-bookworm "$CTX/python" >/dev/null
else
  echo "python:3.12-slim-bookworm exists and was not built here: using it as it is"
fi
docker image ls --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'debian:bookworm-slim|python:3.12-slim-bookworm'
