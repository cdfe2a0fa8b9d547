# One command each: set-up, the main job, the tests (README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo

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

# Offline, on the CPU, with random-weight models: shows the pipeline and its outputs (labels are meaningless).
SCENE ?= ../shared/data/scene/Scene
demo: setup
	$(BIN)/python -m helpers predict configs/demo.yaml --set data.test=$(SCENE) --output-dir outputs/demo
