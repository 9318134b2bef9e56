# The two set-up commands of the README: each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/sdtune train examples/quickstart.toml --output runs/quickstart --overwrite

# The report test renders in Debian's chromium; a fresh CI machine gets it from Debian's registry.
test: $(VENV)/.installed-dev
	@if [ -n "$$CI" ] && ! command -v chromium >/dev/null; then \
		echo "installing Debian's chromium for the report's browser test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium) >/dev/null \
			|| echo "could not install chromium: the browser test will fail"; \
	fi
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf runs build src/*.egg-info .pytest_cache
