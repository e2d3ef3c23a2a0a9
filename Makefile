# make help: what each target does. `make train` and `make test` set up .venv themselves on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

OPTIMIZERS ?= adam,sgd_steplr
SEEDS      ?= 0,1,2
COMPARE_DIR := outputs/multiruns/$(shell date +%Y-%m-%d_%H-%M-%S)_compare

.PHONY: help install train sweep compare tensorboard mlflow optuna-dashboard notebook notebook-run bench bench-quick bench-gpu test test-full test-floors lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,export,scale,track]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install cnnlab (editable) with the dev tools and the export, scale and track extras

train: $(VENV)/.installed  ## train once: make train ARGS="optimizer=sgd_steplr trainer.max_epochs=5"
	$(BIN)/python src/train.py $(ARGS)

sweep: $(VENV)/.installed  ## multirun: make sweep ARGS="optimizer=adam,sgd_steplr seed=0,1,2"
	$(BIN)/python src/train.py --multirun $(or $(ARGS),optimizer=adam,sgd_steplr)

compare: $(VENV)/.installed  ## sweep OPTIMIZERS × SEEDS (+ ARGS), then report.md + curves.png in the sweep dir
	$(BIN)/python src/train.py --multirun optimizer=$(OPTIMIZERS) seed=$(SEEDS) hydra.sweep.dir=$(COMPARE_DIR) $(ARGS); \
	status=$$?; $(BIN)/python src/compare.py $(COMPARE_DIR) && exit $$status

# The first look: the learning rate, the training loss and the validation accuracy (clear the filter for the rest).
FIRST_LOOK := http://127.0.0.1:6006/?tagFilter=val%2Facc%24%7Ctrain%2Floss%7Clr-\#timeseries

tensorboard: $(VENV)/.installed  ## TensorBoard over every run; open the URL it prints first
	@echo "the learning rate, training loss and validation accuracy: $(FIRST_LOOK)"
	$(BIN)/tensorboard --logdir outputs --host 127.0.0.1   # this machine only; --host 0.0.0.0 (or --bind_all) to share

mlflow: $(VENV)/.installed  ## MLflow's UI over the runs of logger=mlflow (outputs/mlflow.db), on 127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath outputs)/mlflow.db --host 127.0.0.1 --port 5000

optuna-dashboard: $(VENV)/.installed  ## optuna-dashboard over a search's study: make optuna-dashboard STUDY=outputs/multiruns/<sweep>/optuna.db
	@test -n "$(STUDY)" || { echo "error: name the study: make optuna-dashboard STUDY=<sweep dir>/optuna.db (or optuna.journal)"; exit 1; }
	$(BIN)/optuna-dashboard $(if $(filter %.db,$(STUDY)),sqlite:///$(abspath $(STUDY)),$(STUDY)) --host 127.0.0.1 --port 8080

notebook: $(VENV)/.installed  ## the lecture as a notebook in JupyterLab (notebooks/cnn_modules.ipynb; adds the notebook extra)
	$(BIN)/pip install --quiet -e '.[notebook]'
	$(BIN)/jupyter lab notebooks/cnn_modules.ipynb

notebook-run: $(VENV)/.installed  ## run the notebook for real and save its outputs (CIFAR-10, ~6 min on 2 CPU cores)
	$(BIN)/python notebooks/run.py

bench: $(VENV)/.installed  ## throughput (ours, bare loop, DataLoader recipe) + time to 70.51 % → docs/benchmarks.md (~25 min)
	$(BIN)/python bench/bench.py --write docs/benchmarks.md
	$(BIN)/python bench/time_to_accuracy.py --append docs/benchmarks.md

bench-quick: $(VENV)/.installed  ## the same table from fewer steps, printed (< 2 min)
	$(BIN)/python bench/bench.py --quick

bench-gpu: $(VENV)/.installed  ## on a CUDA machine: throughput + time to 70.51 % → outputs/gpu-bench.md (< 8 min)
	PYTHON=$(BIN)/python bash bench/gpu.sh

# Two tiers (docs/testing.md). `make test`: every test not marked slow, in pytest's process on tiny data: each
# room and each src/*.py run at least once. `make test-full`: the same tier under coverage (its report; a module
# of src/ none of whose functions ran fails tests/test_tiers.py), then the tests marked slow: real processes,
# signals, DDP, launchers, searches, servers, the notebook, the families of many cases, further runs of a room.
# One room: make test ARGS=tests/test_data.py (or ARGS="-k resume"); a room with its slow tests: ARGS="-m '' tests/…".
test: $(VENV)/.installed  ## the fast tier: every room and src/*.py on tiny data, in-process (96 s on 2 EPYC cores)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-full: $(VENV)/.installed  ## every test: the fast tier under coverage, then the slow tier (10.5 min); what CI runs
	$(BIN)/python -m pytest -m "not slow" --cov --cov-report=term
	$(BIN)/python -m pytest -m slow

# The floors of pyproject.toml's pure-Python dependencies (lightning>=2.6.0 → lightning==2.6.0), installed into
# .floors/ in front of .venv's own versions.
FLOORED := lightning torchmetrics hydra-core omegaconf tensorboard
FLOORS   = $(shell $(BIN)/python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(*(re.sub(r'>=([^,<]+).*', r'==\1', d) for d in deps if re.split('[<>=]', d)[0] in '$(FLOORED)'.split()))")

test-floors: $(VENV)/.installed  ## the oldest versions pyproject.toml admits: a part of the suite on them (~3 min)
	rm -rf .floors && $(BIN)/pip install --quiet --no-deps --target .floors $(FLOORS)
	PYTHONPATH=.floors $(BIN)/python -c "import importlib.metadata as m; print('floors:', *(f'{p}=={m.version(p)}' for p in '$(FLOORED)'.split()))"
	PYTHONPATH=.floors $(BIN)/python -m pytest -q tests/test_train.py tests/test_resume.py tests/test_recipe.py tests/test_bad_input.py tests/test_fuzz.py

lint: $(VENV)/.installed  ## ruff: lint and format check
	$(BIN)/ruff check src tests bench notebooks
	$(BIN)/ruff format --check src tests bench notebooks

clean:  ## remove outputs and caches (keeps .venv and the decoded-data cache)
	rm -rf outputs/runs outputs/multiruns outputs/evals .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
