# entropo-trl developer commands. `make test` works on a fresh clone: it creates .venv, installs the package with its
# test dependencies (a CPU build of torch on machines without a GPU) and runs the tests offline.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a machine without a GPU this pin resolves to a local CPU wheel; override it for other machines,
# e.g. `make test TORCH_SPEC=torch` on a CUDA box.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE := offline

.PHONY: install sandbox-deps test test-all lint format bench demo clean

install: sandbox-deps $(VENV)/.installed

# The isolated local sandbox (`--sandbox local`, the default) needs bubblewrap: installed here when apt-get can (as root,
# e.g. on CI); elsewhere a warning names the command.
sandbox-deps:
	@if ! command -v bwrap >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			echo "installing bubblewrap (bwrap) for the local sandbox"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
		else \
			echo "warning: bubblewrap (bwrap) is missing; --sandbox local needs it: apt-get install bubblewrap"; \
		fi; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# Keep an already installed torch; otherwise take the pinned (CPU on this kind of machine) build first, so that
	@# resolving the package's own `torch>=...` requirement never pulls several GB of CUDA wheels.
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -q -e ".[test]"
	touch $@

test: install
	TQDM_DISABLE=1 $(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	TQDM_DISABLE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

SOURCES := entropo_trl tests bench data_prep recipes eval

lint: install
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)

format: install
	$(PY) -m ruff check --fix $(SOURCES)
	$(PY) -m ruff format $(SOURCES)

bench: install
	$(PY) bench/trainer_overhead.py
	$(PY) bench/data_pool.py
	$(PY) bench/rollout_concurrency.py
	$(PY) bench/selection.py

demo: install
	$(VENV)/bin/entropo demo --workdir demo_out

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
