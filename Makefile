# Set-up and main commands. Each target creates or refreshes the local virtual environment .venv.
# On a machine without the local CPU wheel of torch, add the CPU index, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: venv test lint typecheck pytest clean demo

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

LINT_DIRS := $(wildcard src tests benchmarks)

lint: venv
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The main job: a synthetic patient registered with the bundled models; opens as
# demo_output/report.html.
demo: venv
	$(BIN)/kidneyreg demo --out demo_output

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
