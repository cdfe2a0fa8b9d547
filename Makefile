# One command each: set-up, the main job, the tests (README). Everything runs from the project's .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := uv==0.13.9
# apt-get as make setup runs it: no questions, and waiting for another apt-get (several set-ups at once) to finish
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300

# The challenge's test images: data/Scene (`make data`), else the copy beside the checkout.
SCENE ?= $(if $(wildcard data/Scene),data/Scene,../shared/data/scene/Scene)
INTEL ?= ../shared/data/intel_test
INTEL_CLASS_MAP := buildings=Buildings,forest=Forests,glacier=Glacier,mountain=Mountains,sea=Sea,street=Street
# The demo's labeled dev set: configs/demo.yaml names it and says how to build it from the Intel photos
# (data.dev.build); the first notebook or command that needs it builds it, in seconds.
DEMO_DEV ?= data/dev-demo
DEMO_SETS = --set data.test=$(SCENE) --set data.dev.path=$(DEMO_DEV) --set data.dev.build.source=$(INTEL)
# `make lab RUN=outputs/demo` opens a run folder (its executed notebooks) instead of the source notebooks.
RUN ?=

.PHONY: setup test lint demo dev-demo sweep-demo reproduce data dev-data lab bench

setup: $(VENV)/.installed

# uv installs the same pins as pip would, from the same sources (tools/pip_sources.py hands it pip's configuration,
# which it does not read), several times faster; the bytecode is compiled once here, not by every process (these
# machines set PYTHONDONTWRITEBYTECODE): the libraries' by uv, the workbench's and the tests' own (an editable
# install, which uv leaves as source) by compileall; a module changed since is compiled in memory, as before.
# requirements.txt is what a run needs, the `dev` group (pyproject.toml) what the tests and the lint need.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(UV)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode --index-strategy unsafe-best-match \
		$$($(PYTHON) tools/pip_sources.py) -r requirements.txt --group dev -e .
	$(BIN)/python -m compileall -q helpers tests
	$(BIN)/python -m helpers install-kernel
	@# headless Chromium for the JupyterLab test (tests/test_lab.py), from Debian's packages where it is missing
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		$(APT_INSTALL) chromium >/dev/null || (apt-get update -q >/dev/null && $(APT_INSTALL) chromium >/dev/null)
	@# Slurm and munge for the single-node cluster of the Slurm tests (tests/slurm_cluster.py), the same way
	[ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		$(APT_INSTALL) slurm-wlm munge >/dev/null || \
		(apt-get update -q >/dev/null && $(APT_INSTALL) slurm-wlm munge >/dev/null)
	touch $@

# The lint first (a second), then one worker per core and one more (pytest-xdist: the Slurm, JupyterLab and
# torchrun tests spend much of their time waiting on other processes), a test module per worker at a time (its
# fixtures are built once); the 15 slowest tests are listed at the end.
test: lint
	$(BIN)/python -m pytest -q -n $$(( $$(nproc) + 1 )) --dist loadscope --durations 15

lint: setup
	$(BIN)/ruff check helpers tests checks notebooks tools

# The winning solution, exactly: needs a GPU and the models' weights (offline it stops at once and says why).
reproduce: setup
	$(BIN)/python -m helpers run configs/winner.yaml

# Offline, on the CPU, with random-weight models: all five notebooks, the dev-set ablations included, in a few
# minutes (labels meaningless); ends with a summary: the run folder, its figures, how to compare or open it.
demo: setup
	$(BIN)/python -m helpers run configs/demo.yaml $(DEMO_SETS) --output-dir outputs/demo

# The demo over a small grid (configs/sweeps/demo.yaml: two sharpening factors, two prompt-group choices), two points
# at a time on the CPU; ends with the report's table and where the report is (outputs/sweep-demo).
sweep-demo: setup
	$(BIN)/python -m helpers sweep configs/sweeps/demo.yaml $(DEMO_SETS) --jobs 2 --output-dir outputs/sweep-demo

dev-demo: setup
	$(BIN)/python -m helpers make-dev --config configs/demo.yaml $(DEMO_SETS)

# The challenge data (Hugging Face dataset sw24/sw24) into data/Scene, checksum verified.
data: setup
	$(BIN)/python -m helpers download-data --dest data

# The labeled dev set: the Intel test photos degraded so that their estimated blur matches the test set's.
dev-data: setup
	$(BIN)/python -m helpers make-dev $(INTEL) --out data/dev --test $(SCENE) --class-map $(INTEL_CLASS_MAP)

# JupyterLab with the project's kernel and settings (no news pop-up): install-kernel (re)writes both.
lab: setup
	$(BIN)/python -m helpers install-kernel
	$(BIN)/jupyter lab $(if $(RUN),$(RUN),notebooks)

# The workbench against the winner's loop (BENCHMARKS.md): about 12 minutes on 2 CPU cores.
bench: setup
	$(BIN)/python -m helpers.bench --images 512 --scene $(SCENE)
