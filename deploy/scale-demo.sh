#!/usr/bin/env bash
# Scale-out demo (deploy/scale_demo.py): Redis, S3 (moto), two API replicas and two learning
# workers as separate hosts (network namespaces as root, else 127.0.0.x), checked end to end.
# Figures: results/scale-demo.json. Extra flags go to the driver (--engine vllm, --no-netns).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LOOPCHAT_PYTHON:-$(ls -d ~/.cache/loopchat/venv-*/bin/python 2>/dev/null | head -1)}
[ -x "$PY" ] || PY=$(deploy/install.sh --test)/bin/python
exec "$PY" deploy/scale_demo.py "$@"
