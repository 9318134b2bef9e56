# The two set-up commands of the README: each creates .venv when missing and installs what it
# needs from the committed lock (constraints.txt), so a fresh machine gets exactly the versions
# the suite was last run with, whatever the registry has published since.
#
#   make lock          resolve the newest versions pyproject.toml admits, run the suite on them
#                      in .venv-latest, and write constraints.txt only if it passes
#   make test-latest   the same without writing the lock: drift is seen on purpose
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
LATEST := .venv-latest

.PHONY: quickstart quickstart-xl quickstart-sd3 finetune test lint clean lock test-latest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip and setuptools come from the lock too, and the project builds without isolation, so no
# build step fetches whatever is newest that day
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install --quiet -c $(LOCK) --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install --quiet -c $(LOCK) --no-build-isolation -e '.[dev]'
	$(BIN)/python -m pip check
	touch $@ $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/sdtune train examples/quickstart.toml --output runs/quickstart --overwrite

# A LoRA fine-tune you can see on a CPU: the quickstart's model learns a style from a folder
# of images with caption files (trains the quickstart first when its model is missing).
finetune: $(VENV)/.installed
	@test -f runs/quickstart/model/sdtune_model.json || $(MAKE) quickstart
	$(BIN)/sdtune train examples/finetune_folder.toml --output runs/finetune_folder --overwrite

quickstart-xl: $(VENV)/.installed
	$(BIN)/sdtune train examples/quickstart_xl.toml --output runs/quickstart_xl --overwrite

quickstart-sd3: $(VENV)/.installed
	$(BIN)/sdtune train examples/quickstart_sd3.toml --output runs/quickstart_sd3 --overwrite

# The report test renders in Debian's chromium; a fresh CI machine gets it from Debian's registry.
define CHROMIUM
	@if [ -n "$$CI" ] && ! command -v chromium >/dev/null; then \
		echo "installing Debian's chromium for the report's browser test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium) >/dev/null \
			|| echo "could not install chromium: the browser test will fail"; \
	fi
endef

# the suite runs on every core there is, up to JOBS (one test file per worker at a time: a
# file's shared fixtures are built once); JOBS=1 runs it in one process
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_JOBS = $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile)

# --durations: the slowest tests named in every run's log (CI's included), to keep it short
test: $(VENV)/.installed-dev
	$(CHROMIUM)
	$(BIN)/python -m pytest -q $(PYTEST_JOBS) --durations=15

# The newest releases the ranges admit, resolved anew on every call, in a venv of their own
# (the lock's .venv is untouched).
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager --no-build-isolation -e '.[dev]'
	$(LATEST)/bin/python -m pip check
	$(CHROMIUM)
	$(LATEST)/bin/python -m pytest -q $(PYTEST_JOBS)

lock: test-latest
	{ echo "# The versions the suite passed with: written by 'make lock' on $$(date -u +%Y-%m-%d)," ; \
	  echo "# CPython $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')." ; \
	  echo "# 'make test' and 'make quickstart' install exactly these; pyproject.toml keeps the ranges." ; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable ; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@echo "wrote $(LOCK); commit it"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf runs build src/*.egg-info .pytest_cache $(LATEST)
