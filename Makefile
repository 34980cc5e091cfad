# The two commands of the README. `make setup` installs and runs the pipeline on the embedded sample;
# `make test` runs the tests (installing first when .venv is missing). `.ci/run` calls `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup test

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	. $(VENV)/bin/activate && dvc repro

test: $(STAMP)
	. $(VENV)/bin/activate && NO_ALBUMENTATIONS_UPDATE=1 pytest -q
