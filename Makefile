# The two commands of the README. `make setup` installs and runs the pipeline on the embedded sample;
# `make test` runs the tests (installing first when .venv is missing). `.ci/run` calls `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

# Debian's Chromium: the data-card site tests open every page in it, headless (installed once if missing)
BROWSER := /usr/bin/chromium

.PHONY: setup test

# packages appear to an editable install only as they were when it was made: reinstall when one is added
$(STAMP): pyproject.toml $(wildcard */__init__.py */*/__init__.py)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	. $(VENV)/bin/activate && dvc repro

$(BROWSER):
	@echo "installing Debian's chromium (headless browser for the data-card tests)"
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -q chromium || ($$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium)

test: $(STAMP) $(BROWSER)
	. $(VENV)/bin/activate && NO_ALBUMENTATIONS_UPDATE=1 pytest -q
