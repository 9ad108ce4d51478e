#!/usr/bin/env bash
# The peers that `llmk bench --peers` compares against, in their own environment
# (.venv-peers), never in llmk's: llama.cpp (llama-cpp-python with its OpenAI server;
# PyPI ships it as source, so it is compiled here, ~10 min on 2 cores), OpenVINO GenAI
# (the same release as llmk's openvino, to read the same IR) and onnxruntime-genai.
# Hugging Face transformers `generate`, the baseline, runs in llmk's own environment.
#
#     bash bench/setup_peers.sh [VENV]      # default .venv-peers
#
# A peer that fails to install is reported and left out; the others still install.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-peers}
PIP="$VENV/bin/python -m pip install --quiet --disable-pip-version-check"
python3 -m venv "$VENV"
$PIP --upgrade pip wheel
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
OPENVINO=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('openvino'))" 2>/dev/null)
failed=()
install() {  # NAME PIP-ARGS...
    local name=$1; shift
    if $PIP "$@"; then echo "peer $name: installed"; else echo "peer $name: FAILED to install, left out"; failed+=("$name"); fi
}
install llama.cpp "llama-cpp-python[server]"
install openvino-genai "openvino-genai${OPENVINO:+==$OPENVINO.*}"
install onnxruntime-genai onnxruntime-genai
$PIP numpy transformers  # transformers: to convert the tokenizer for OpenVINO GenAI (no torch needed)
echo "peers environment: $VENV${failed:+ (not installed: ${failed[*]})}"
