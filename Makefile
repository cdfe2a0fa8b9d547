# One command each: set-up, the main job, the tests (README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check helpers tests bench
