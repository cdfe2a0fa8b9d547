# One command each: set-up, the main job, the tests (README). Everything runs from the project's .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The challenge's test images: data/Scene (`make data`), else the copy beside the checkout.
SCENE ?= $(if $(wildcard data/Scene),data/Scene,../shared/data/scene/Scene)
INTEL ?= ../shared/data/intel_test
INTEL_CLASS_MAP := buildings=Buildings,forest=Forests,glacier=Glacier,mountain=Mountains,sea=Sea,street=Street
# The demo evaluates on the labeled dev set too once `make dev-data` has built it.
DEMO_DEV := $(if $(wildcard data/dev),--set data.dev.path=data/dev --set data.dev.limit=120)

.PHONY: setup test lint demo reproduce data dev-data lab bench

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m helpers install-kernel
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check helpers tests bench notebooks

# The winning solution, exactly: needs a GPU and the models' weights (offline it stops at once and says why).
reproduce: setup
	$(BIN)/python -m helpers run configs/winner.yaml

# Offline, on the CPU, with random-weight models: the whole notebook pipeline in a few minutes (labels meaningless).
demo: setup
	$(BIN)/python -m helpers run configs/demo.yaml --set data.test=$(SCENE) $(DEMO_DEV) --output-dir outputs/demo

# The challenge data (Hugging Face dataset sw24/sw24) into data/Scene, checksum verified.
data: setup
	$(BIN)/python -m helpers download-data --dest data

# The labeled dev set: the Intel test photos degraded so that their estimated blur matches the test set's.
dev-data: setup
	$(BIN)/python -m helpers make-dev $(INTEL) --out data/dev --test $(SCENE) --class-map $(INTEL_CLASS_MAP)

lab: setup
	$(BIN)/jupyter lab notebooks

# The workbench against the winner's loop (BENCHMARKS.md): about 12 minutes on 2 CPU cores.
bench: setup
	$(BIN)/python -m helpers.bench --images 512 --scene $(SCENE)
