#!/usr/bin/env bash
# The peers that `llmk bench --peers` compares against, in their own environment
# (.venv-peers), never in llmk's: llama.cpp (llama-cpp-python; PyPI ships it as source,
# so it is compiled here, ~10 min on 2 cores), llama.cpp's own OpenAI server,
# llama-server (the serving reference: parallel slots, continuous batching; compiled
# from the llama.cpp source that llama-cpp-python vendors, so both rows run the same
# llama.cpp, ~20 min on 2 cores), OpenVINO GenAI (the same release as llmk's openvino,
# to read the same IR) and onnxruntime-genai. Hugging Face transformers `generate`, the
# baseline, runs in llmk's own environment.
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
# llama-server, built from the sdist of the llama-cpp-python installed here, into
# $VENV/bin/llama-server; $VENV/llama-server.source names that sdist (the report's version).
# Skipped when that binary was already built from the same sdist. No web UI, no HTTPS.
build_llama_server() {
    local sdist work status
    sdist="llama-cpp-python==$($VENV/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")" || return 1
    if [ -x "$VENV/bin/llama-server" ] && [ "$(cat "$VENV/llama-server.source" 2>/dev/null)" = "$sdist" ]; then
        return 0
    fi
    work=$(mktemp -d)
    $VENV/bin/python -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps "$sdist" \
        -d "$work" &&
    tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" &&
    cmake -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF > "$work/cmake.log" 2>&1 &&
    cmake --build "$work/build" --target llama-server >> "$work/cmake.log" 2>&1 &&
    command install -m 755 "$work/build/bin/llama-server" "$VENV/bin/llama-server" &&  # the program, not install()
    echo "$sdist" > "$VENV/llama-server.source"
    status=$?
    [ $status -eq 0 ] || tail -20 "$work/cmake.log" 2>/dev/null
    rm -rf "$work"
    return $status
}
install llama.cpp llama-cpp-python
if build_llama_server; then echo "peer llama-server: installed"; else echo "peer llama-server: FAILED to build, left out"; failed+=(llama-server); fi
install openvino-genai "openvino-genai${OPENVINO:+==$OPENVINO.*}"
install onnxruntime-genai onnxruntime-genai
$PIP numpy transformers  # transformers: to convert the tokenizer for OpenVINO GenAI (no torch needed)
echo "peers environment: $VENV${failed:+ (not installed: ${failed[*]})}"
