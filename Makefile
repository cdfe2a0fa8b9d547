# One command each: set-up, the main job, the tests (README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo dev-data

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

SCENE ?= ../shared/data/scene/Scene
INTEL ?= ../shared/data/intel_test
INTEL_CLASS_MAP := buildings=Buildings,forest=Forests,glacier=Glacier,mountain=Mountains,sea=Sea,street=Street

# The labeled dev set: the Intel test photos degraded so that their estimated blur matches the test set's.
dev-data: setup
	$(BIN)/python -m helpers make-dev $(INTEL) --out data/dev --test $(SCENE) --class-map $(INTEL_CLASS_MAP)

# Offline, on the CPU, with random-weight models: shows the pipeline and its outputs (labels are meaningless).
demo: setup
	$(BIN)/python -m helpers predict configs/demo.yaml --set data.test=$(SCENE) --output-dir outputs/demo
