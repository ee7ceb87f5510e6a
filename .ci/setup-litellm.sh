#!/usr/bin/env bash
# Create .venv-litellm with the LiteLLM proxy, apart from the node's venv so its pins never touch it.
# Idempotent: does nothing when the proxy is already installed and importable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-litellm
if [ -x "$VENV/bin/litellm" ] && "$VENV/bin/python" -c 'import importlib.metadata as m; assert m.version("litellm") == "1.106.2"' >/dev/null 2>&1; then
    echo "setup-litellm: $VENV already has litellm[proxy]"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q 'litellm[proxy]==1.106.2'
"$VENV/bin/litellm" --version || true
echo "setup-litellm: installed litellm[proxy] into $VENV"
